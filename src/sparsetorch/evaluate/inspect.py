"""Per-layer sparsity of a saved model: a table and a heatmap.

Reads `sparsity.json` when sparsetorch wrote the directory, else measures the zeros of
every 2-D weight in its safetensors files, so any HF model directory can be inspected. For a
directory with a compressed form, each layer also gets the bits per weight it is stored in
(the bytes of its tensors there, quantized or not, entropy-coded or not, over its weights).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from sparsetorch.formats.checkpoint import COMPRESSED_DIR, read_compressed_state_dict, stored_bytes
from sparsetorch.formats.pruned import SPARSITY_FILE, read_sparsity

__all__ = ["LayerSparsity", "format_table", "layer_sparsity", "plot_sparsity"]

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    sparsity: float
    bits: float | None = None  # stored bits per weight in the compressed form, where there is one

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def _from_record(directory: Path) -> list[LayerSparsity]:
    record = read_sparsity(directory)
    compressed = directory / COMPRESSED_DIR
    sizes = stored_bytes(compressed) if (compressed / "model.safetensors").is_file() else {}
    rows = []
    for name, layer in record["layers"].items():
        shape = tuple(layer["shape"])
        bits = 8 * sizes[name] / max(math.prod(shape), 1) if name in sizes else None
        rows.append(LayerSparsity(name, shape, float(layer["sparsity"]), bits))
    return rows


def _from_weights(directory: Path) -> list[LayerSparsity]:
    files = sorted(directory.glob("*.safetensors"))
    rows = []
    if files:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                        tensor = f.get_tensor(key)
                        zeros = tensor.numel() - int(torch.count_nonzero(tensor))
                        rows.append(LayerSparsity(key.removesuffix(".weight"), tuple(tensor.shape), zeros / tensor.numel()))
        return rows
    if (directory / COMPRESSED_DIR).is_dir():
        state, _ = read_compressed_state_dict(directory / COMPRESSED_DIR)
        for key, tensor in state.items():
            if key.endswith(".weight") and tensor.dim() == 2:
                zeros = tensor.numel() - int(torch.count_nonzero(tensor))
                rows.append(LayerSparsity(key.removesuffix(".weight"), tuple(tensor.shape), zeros / tensor.numel()))
        return rows
    raise FileNotFoundError(f"{directory} holds no {SPARSITY_FILE} and no *.safetensors weights to inspect")


def layer_sparsity(directory: str | Path) -> list[LayerSparsity]:
    """Sparsity of every weight matrix in a model directory.

    Raises:
        FileNotFoundError: not a directory, or nothing in it to inspect.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if (directory / SPARSITY_FILE).exists():
        return _from_record(directory)
    return _from_weights(directory)


def format_table(rows: list[LayerSparsity]) -> str:
    """A fixed-width text table with a total line weighted by layer size (and a bits-per-weight
    column when the rows know how they are stored)."""
    width = max([len(r.name) for r in rows] + [5])
    with_bits = bool(rows) and all(r.bits is not None for r in rows)
    bits_head = f"  {'bits/w':>6}" if with_bits else ""
    lines = [f"{'layer':<{width}}  {'shape':>13}  {'sparsity':>8}{bits_head}", "-" * (width + 25 + len(bits_head))]
    for r in rows:
        shape = "x".join(str(s) for s in r.shape)
        lines.append(f"{r.name:<{width}}  {shape:>13}  {r.sparsity:>8.2%}" + (f"  {r.bits:>6.2f}" if with_bits else ""))
    total = sum(r.numel for r in rows)
    zeros = sum(r.sparsity * r.numel for r in rows)
    bits = f"  {sum(r.bits * r.numel for r in rows) / max(total, 1):>6.2f}" if with_bits else ""
    lines.append("-" * (width + 25 + len(bits_head)))
    lines.append(f"{'total':<{width}}  {total:>13,}  {zeros / max(total, 1):>8.2%}{bits}")
    return "\n".join(lines)


def _grid(rows: list[LayerSparsity]) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    """(layer kinds, block indices, sparsity per (kind, block)) for names with a block index."""
    cells, kinds, blocks = {}, [], []
    for r in rows:
        match = _BLOCK_INDEX.search(r.name)
        if not match:
            continue
        block = int(match[1])
        kind = r.name[match.end():]
        cells[(kind, block)] = r.sparsity
        if kind not in kinds:
            kinds.append(kind)
        if block not in blocks:
            blocks.append(block)
    return kinds, sorted(blocks), cells


def plot_sparsity(rows: list[LayerSparsity], path: str | Path, title: str = "") -> Path:
    """Heatmap of sparsity (layer kind x block), or bars when names carry no block index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    kinds, blocks, cells = _grid(rows)
    if kinds:
        grid = [[cells.get((kind, b), float("nan")) for b in blocks] for kind in kinds]
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(blocks) + 3), 0.45 * len(kinds) + 1.8))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_xlabel("block")
        fig.colorbar(image, ax=ax, label="sparsity")
    else:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
        ax.barh([r.name for r in rows], [r.sparsity for r in rows])
        ax.set_xlim(0, 1)
        ax.set_xlabel("sparsity")
    ax.set_title(title or "per-layer sparsity")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
