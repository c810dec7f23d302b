"""`sparsetorch bench DIR`: dense vs sparse runtime on one pruned model, in one run.

Each variant runs in its own fresh process (`bench_worker`), alternating dense, sparse, dense,
sparse ... for `rounds` rounds, so slow drifts of the machine hit both alike and each peak RSS
is the variant's own. Reported: median prefill and decode tokens/s over all repeats, peak RSS
(median over rounds), size on disk, and sparse/dense ratios; and whether greedy decoding
produced the very same tokens. Both variants run in the same decoder: 'lean' (`models.llama`,
no transformers in the process), 'transformers', or 'auto' (lean for the families it runs).
Peak RSS is the model's run alone: this process tokenizes the prompt and prefill text once and
hands the ids to the workers, and each worker fixes glibc's mmap threshold (`sparsetorch.malloc`)
so that freed loading temporaries go back to the OS in both variants.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sparsetorch.evaluate.bench_worker import DECODERS, token_ids
from sparsetorch.evaluate.report import file_size
from sparsetorch.formats.checkpoint import COMPRESSED_DIR, WEIGHTS_FILE
from sparsetorch.runtime.config import RuntimeConfig

__all__ = ["BenchConfig", "BenchResult", "VariantResult", "run_bench", "run_variant", "summarize_runs"]

VARIANTS = ("dense", "sparse")


@dataclass(frozen=True)
class BenchConfig:
    """How to bench: tokens, repeats per process, processes per variant, the sparse runtime's config
    and the decoder both variants run in ('auto', 'lean' or 'transformers')."""

    prefill_tokens: int = 256
    decode_tokens: int = 128
    repeats: int = 3
    rounds: int = 2
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    decoder: str = "auto"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        for name in ("prefill_tokens", "repeats", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens must be at least 2, got {self.decode_tokens}")


@dataclass(frozen=True)
class VariantResult:
    """Medians over every repeat of every round of one variant."""

    variant: str
    decoder: str
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    peak_rss_bytes: int
    disk_bytes: int
    linear_share: float
    generated: tuple[int, ...]
    runs: tuple[dict, ...]


@dataclass(frozen=True)
class BenchResult:
    dense: VariantResult
    sparse: VariantResult

    @property
    def same_tokens(self) -> bool:
        return self.dense.generated == self.sparse.generated

    def table(self) -> str:
        """Markdown: both variants and the sparse/dense ratios."""
        d, s = self.dense, self.sparse
        rows = [("dense (pruned, dense matmuls)", d), ("sparse runtime", s)]
        lines = ["| variant | prefill tok/s | decode tok/s | peak RSS MB | weights on disk MB | linear share of decode |",
                 "|---|---|---|---|---|---|"]
        for label, r in rows:
            lines.append(f"| {label} | {r.prefill_tokens_per_second:.1f} | {r.decode_tokens_per_second:.2f} "
                         f"| {r.peak_rss_bytes / 1e6:.0f} | {r.disk_bytes / 1e6:.1f} | {r.linear_share:.0%} |")
        lines.append(f"| sparse / dense | {s.prefill_tokens_per_second / d.prefill_tokens_per_second:.2f}× "
                     f"| {s.decode_tokens_per_second / d.decode_tokens_per_second:.2f}× "
                     f"| {s.peak_rss_bytes / d.peak_rss_bytes:.2f}× | {s.disk_bytes / d.disk_bytes:.2f}× | |")
        return "\n".join(lines)


def run_variant(directory: Path, variant: str, config: BenchConfig, out: Path, ids: dict[str, list[int]]) -> dict:
    """One `bench_worker` run of `variant` ('dense' or 'sparse') in a fresh process; its JSON result
    (also written to `out`). Benchmarks that alternate with other engines call it one run at a time.

    Raises:
        RuntimeError: the worker process failed (its stderr's tail in the message).
    """
    job = out.with_suffix(".job.json")
    job.write_text(json.dumps({
        "directory": str(directory), "variant": variant, "prefill_tokens": config.prefill_tokens,
        "decode_tokens": config.decode_tokens, "repeats": config.repeats, "runtime": config.runtime.to_dict(),
        "decoder": config.decoder, "ids": ids,
    }))
    done = subprocess.run([sys.executable, "-m", "sparsetorch.evaluate.bench_worker", str(job), str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {variant} bench process failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def summarize_runs(variant: str, runs: list[dict], disk_bytes: int) -> VariantResult:
    """Medians over the runs of one variant (`run_variant` results)."""
    prefill = [r["prefill_tokens"] / s for r in runs for s in r["prefill_seconds"]]
    decode = [r["decode_tokens"] / s for r in runs for s in r["decode_seconds"]]
    return VariantResult(
        variant=variant,
        decoder=runs[0]["decoder"],
        prefill_tokens_per_second=statistics.median(prefill),
        decode_tokens_per_second=statistics.median(decode),
        peak_rss_bytes=int(statistics.median(r["peak_rss_bytes"] for r in runs)),
        disk_bytes=disk_bytes,
        linear_share=statistics.median(r["linear_share"] for r in runs),
        generated=tuple(runs[0]["generated"]),
        runs=tuple(runs),
    )


def run_bench(directory: str | Path, config: BenchConfig | None = None, progress: bool = True) -> BenchResult:
    """Bench the dense and the sparse runtime form of a `sparsetorch prune` output directory.

    Raises:
        FileNotFoundError: `directory` lacks the dense or the compressed weights.
        RuntimeError: a bench process failed (its stderr is in the message).

    Example:
        >>> print(run_bench("pruned/smollm2-70").table())
    """
    directory = Path(directory)
    disk = {"dense": directory / WEIGHTS_FILE, "sparse": directory / COMPRESSED_DIR / WEIGHTS_FILE}
    for path in disk.values():
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; bench needs a directory written by `sparsetorch prune`")
    config = config or BenchConfig()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="sparsetorch-bench-") as scratch:
        ids = token_ids(directory, config.decoder, config.prefill_tokens)  # here: workers' peak RSS is the run alone
        for round_ in range(config.rounds):
            for variant in VARIANTS:
                if progress:
                    print(f"==> round {round_ + 1}/{config.rounds}: {variant}", flush=True)
                runs[variant].append(run_variant(directory, variant, config, Path(scratch) / f"{variant}-{round_}.json", ids))
    dense, sparse = (summarize_runs(v, runs[v], file_size(disk[v])) for v in VARIANTS)
    return BenchResult(dense, sparse)
