"""Side-by-side reports: a markdown table and a figure comparing dense and sparse."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelMeasure", "file_size", "markdown_table", "plot_comparison"]


@dataclass(frozen=True)
class ModelMeasure:
    """What was measured for one model variant; None where not measured."""

    label: str
    perplexity: float | None = None
    file_bytes: int | None = None
    decode_tokens_per_second: float | None = None
    sparsity: float | None = None


def file_size(path: str | Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: list[ModelMeasure], baseline: ModelMeasure) -> str:
    """Rows with each measure and its ratio to `baseline`."""

    def ratio(a: float | None, b: float | None) -> str:
        return "–" if a is None or not b else f"{a / b:.2f}×"

    lines = [
        "| model | sparsity | perplexity | ppl ratio | file MB | size ratio | decode tok/s | speed ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mb = None if r.file_bytes is None else r.file_bytes / 1e6
        lines.append(
            f"| {r.label} | {_fmt(r.sparsity, '.1%')} | {_fmt(r.perplexity, '.2f')} "
            f"| {ratio(r.perplexity, baseline.perplexity)} | {_fmt(mb, '.1f')} "
            f"| {ratio(r.file_bytes, baseline.file_bytes)} | {_fmt(r.decode_tokens_per_second, '.1f')} "
            f"| {ratio(r.decode_tokens_per_second, baseline.decode_tokens_per_second)} |"
        )
    return "\n".join(lines)


def plot_comparison(rows: list[ModelMeasure], path: str | Path, title: str = "") -> Path:
    """Three panels: perplexity, file size and decode speed per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("perplexity (lower is better)", [r.perplexity for r in rows]),
        ("file size, MB", [None if r.file_bytes is None else r.file_bytes / 1e6 for r in rows]),
        ("decode tokens/s", [r.decode_tokens_per_second for r in rows]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    labels = [r.label for r in rows]
    for ax, (name, values) in zip(axes, panels):
        heights = [0 if v is None else v for v in values]
        bars = ax.bar(range(len(rows)), heights, color=["#888888"] + ["#2a7ab9"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        for bar, value in zip(bars, values):
            if value is not None:
                ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
