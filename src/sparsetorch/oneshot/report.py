"""What a pruning run did, per layer: the record behind `sparsity.json`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from torch import Tensor

from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.quantize import QuantGrid

__all__ = ["LayerReport", "PruneReport"]


@dataclass(frozen=True)
class LayerReport:
    """One pruned layer: its shape, the sparsity asked for and the sparsity measured."""

    name: str
    shape: tuple[int, ...]
    target_sparsity: float
    sparsity: float
    seconds: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "target_sparsity": self.target_sparsity,
            "sparsity": round(self.sparsity, 6),
            "seconds": round(self.seconds, 4),
        }


@dataclass
class PruneReport:
    """Result of `sparsetorch.prune`: the config, per-layer records and keep masks.

    With `config.quantize`, `grids` holds the value grid of every quantized module by name (the
    pruned layers, e.g. 'model.layers.0.mlp.down_proj', and the embeddings, e.g.
    'model.embed_tokens'), which `save_pruned(..., grids=report.grids)` stores the weights on;
    `quantization` is the record of how (see `oneshot/quantized.py`). Grids are tensors, so
    `to_dict()` leaves them out.
    """

    config: PruneConfig
    layers: dict[str, LayerReport]
    masks: Mapping[str, Tensor] = field(repr=False)  # layer name -> bool keep mask (held packed: `oneshot/masks.py`)
    seconds: float
    blocks: dict = field(default_factory=dict)  # block index -> its reconstruction (reconstruct='block')
    grids: dict[str, QuantGrid] = field(default_factory=dict, repr=False)
    quantization: dict | None = None

    @property
    def sparsity(self) -> float:
        """Zeros over weights, across all pruned layers."""
        total = sum(layer.numel for layer in self.layers.values())
        zeros = sum(layer.sparsity * layer.numel for layer in self.layers.values())
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.config.method,
            "pattern": self.config.pattern,
            "sparsity": round(self.sparsity, 6),
            "config": self.config.to_dict(),
            "seconds": round(self.seconds, 3),
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            **({"blocks": {str(i): _rounded(asdict(fit)) for i, fit in self.blocks.items()}} if self.blocks else {}),
            **({"quantization": self.quantization} if self.quantization is not None else {}),
        }


def _rounded(record: dict) -> dict:
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in record.items()}
