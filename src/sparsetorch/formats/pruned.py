"""The output of `sparsetorch prune`: one directory, loadable dense or compressed.

`save_pruned` writes the dense HF model, `sparsity.json` and the compressed form (see
`sparsetorch.formats.checkpoint` for the layout); `load_pruned` reads either form back
bit-exactly.

Storage does not depend on how the model was pruned: `save_pruned` takes the run's record
as plain data (`PruneReport.to_dict()`), so this module never imports `sparsetorch.oneshot`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetorch.formats.checkpoint import (
    COMPRESSED_DIR,
    WEIGHTS_FILE,
    CorruptFileError,
    atomic_directory,
    load_compressed_model,
    sha256_file,
    write_compressed,
)
from sparsetorch.quantize import QuantGrid

__all__ = ["SPARSITY_FILE", "load_pruned", "read_sparsity", "save_pruned", "structure_name", "verify_dense",
           "write_record"]

SPARSITY_FILE = "sparsity.json"


def structure_name(pattern: str) -> str:
    """compressed-tensors' name for a pattern: N:M stays, everything else is unstructured."""
    return pattern if ":" in pattern else "unstructured"


def save_pruned(
    model: nn.Module,
    out: str | Path,
    report: Mapping[str, Any],
    *,
    tokenizer=None,
    calibration: dict | None = None,
    source: str | None = None,
    codec: str = "zstd",
    overwrite: bool = False,
    finish: Callable[[Path], None] | None = None,
    grids: Mapping[str, QuantGrid] | None = None,
    annotate: Callable[[], dict] | None = None,
) -> Path:
    """Write a pruned model to `out`: dense HF weights, compressed weights and sparsity.json.

    Args:
        model: the pruned Hugging Face model.
        report: `PruneReport.to_dict()` of the run, or any dict of that shape: 'method',
            'pattern', 'sparsity', 'config' (with 'ignore'), 'seconds' and 'layers' (name to
            per-layer record). Plain data, so storage needs nothing from the pruning code;
            it becomes `sparsity.json` with 'source_model', 'calibration' and 'files' added.
        tokenizer: saved alongside so `out` is a complete model directory.
        calibration: how calibration windows were made (source, samples, seqlen, seed).
        source: where the unpruned model came from.
        codec: 'zstd' or 'none' for the compressed form (see `write_compressed`).
        overwrite: replace an existing `out`; otherwise an existing `out` is an error.
        finish: called with the staging directory once everything is written, to add
            files (reports, plots) that appear together with the model or not at all.
        grids: module name ('model.layers.0.mlp.down_proj', 'model.embed_tokens') -> the
            `QuantGrid` its weight lies on (`PruneReport.grids`): the compressed form stores those
            weights as integer codes (`formats.quantized`); the dense form holds their values.
        annotate: called once the weights are written; its fields are added to sparsity.json (the
            run's peak memory, say, which the save itself raises).

    Raises:
        TypeError: `report` is not a mapping (e.g. a `PruneReport` itself).
        FileExistsError: `out` exists and overwrite is False (nothing is written).
        ValueError: a weight named in `grids` is not exactly on its grid (nothing is written).

    Example:
        >>> save_pruned(model, "smollm2-50", report.to_dict(), tokenizer=tokenizer)
    """
    if not isinstance(report, Mapping):
        raise TypeError(f"save_pruned takes the report as a dict: pass report.to_dict(), "
                        f"not a {type(report).__name__}")
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        compressed = staging / COMPRESSED_DIR
        write_compressed(
            model,
            compressed,
            report["layers"].keys(),
            structure=structure_name(report["pattern"]),
            ignore=report["config"]["ignore"],
            codec=codec,
            grids=grids,
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(compressed)
        write_record(staging, report, source=source, calibration=calibration, codec=codec, grids=grids,
                     annotate=annotate)
        if finish is not None:
            finish(staging)
    return out


def write_record(staging: Path, report: Mapping[str, Any], *, source: str | None, calibration: dict | None,
                 codec: str, grids: Mapping[str, QuantGrid] | None = None,
                 annotate: Callable[[], dict] | None = None) -> None:
    """Write `sparsity.json` into a finished staging directory: `report` with where the model and the
    calibration came from, the quantized modules, the files and their SHA-256s, and `annotate()`'s fields."""
    record = dict(report)  # a copy: the caller's dict stays as it was
    record["source_model"] = source
    record["calibration"] = calibration
    if grids:
        record["quantized"] = {name: grid.scheme.name for name, grid in grids.items()}
    record["files"] = {
        "dense": WEIGHTS_FILE,
        "compressed": f"{COMPRESSED_DIR}/{WEIGHTS_FILE}",
        "codec": codec,
        "dense_sha256": {p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))},
    }
    if annotate is not None:
        record.update(annotate())
    (staging / SPARSITY_FILE).write_text(json.dumps(record, indent=2))


def read_sparsity(directory: str | Path) -> dict:
    """The `sparsity.json` record of a pruned directory.

    Raises:
        FileNotFoundError: the directory was not written by `sparsetorch prune`.
    """
    path = Path(directory) / SPARSITY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {SPARSITY_FILE}; was it written by `sparsetorch prune`?")
    return json.loads(path.read_text())


def verify_dense(directory: str | Path) -> None:
    """Check the dense weights of a pruned directory against the SHA-256s its `sparsity.json` records
    (directories without the record, e.g. any other model directory, pass unchecked).

    Raises:
        CorruptFileError: a weights file is missing or damaged.
    """
    directory = Path(directory)
    record = directory / SPARSITY_FILE
    if not record.is_file():
        return
    for name, expected in json.loads(record.read_text()).get("files", {}).get("dense_sha256", {}).items():
        path = directory / name
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing (listed in {SPARSITY_FILE})")
        if sha256_file(path) != expected:
            raise CorruptFileError(f"{path} is damaged: its SHA-256 does not match {SPARSITY_FILE}; "
                                   "prune again, or load the compressed form")


def load_pruned(directory: str | Path, compressed: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a pruned directory as a dense model, from its dense or its compressed weights.

    Raises:
        FileNotFoundError: no such directory or weights.
        CorruptFileError: the weights are damaged.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pruned model directory {directory} does not exist")
    if compressed:
        inner = directory / COMPRESSED_DIR if (directory / COMPRESSED_DIR).is_dir() else directory
        return load_compressed_model(inner, dtype=dtype)
    verify_dense(directory)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32).eval()
