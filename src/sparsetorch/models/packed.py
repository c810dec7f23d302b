"""Linears whose float32 CPU products run oneDNN on weights packed once per version.

torch's float32 `nn.Linear` on CPU calls MKL's sgemm, which packs the weight into its blocked
layout again on every call and zero-fills the output in a pass of its own. One-shot pruning
multiplies each weight by every batch of calibration windows, so the own model path's linears
can run oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, shipped with torch) on a weight
reordered once into oneDNN's layout, and again only when the weight changes: pruning writes it
in place (`targets.set_weight_matrix`), which bumps the tensor's version counter. The products
equal MKL's to float32 rounding (another order of accumulation; tested).

A `PackedLinear` packs only when its model gave it a `PackedWeights` cache (the calibration
model does; an inference model does not), and only for float32 CPU tensors outside autocast and
autograd on a torch build with oneDNN; everything else is `nn.Linear`'s own product. The cache
keeps the packed weights of the last `KEEP` layers used, so memory grows by at most that many
layers' weights: the pipeline runs one block at a time.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetorch.precision import plain_fp32_cpu

__all__ = ["KEEP", "PackedLinear", "PackedWeights", "onednn_linear_ops"]

KEEP = 16  # packed weights kept: more than a Llama block's 7 linears


@functools.cache
def onednn_linear_ops() -> tuple[Callable, Callable] | None:
    """(reorder weight, matmul) of this torch build's oneDNN, or None where it has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        reorder, matmul = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
        product = matmul(torch.ones(1, 3), reorder(torch.ones(2, 3), 1), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return (reorder, matmul) if torch.equal(product, torch.full((1, 2), 3.0)) else None


class PackedWeights:
    """The oneDNN layout of recently used layers' weights, least recently used dropped first.

    An entry is stale once its weight's storage, shape or version counter changed.
    """

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._entries: OrderedDict[nn.Module, tuple[tuple, Tensor]] = OrderedDict()

    def get(self, module: nn.Linear, rows: int) -> Tensor:
        """`module.weight` packed for products with about `rows` input rows."""
        weight = module.weight
        stamp = (weight.data_ptr(), weight._version, tuple(weight.shape))
        entry = self._entries.pop(module, None)
        if entry is None or entry[0] != stamp:
            reorder, _ = onednn_linear_ops()
            entry = (stamp, reorder(weight.detach(), rows))
        self._entries[module] = entry
        while len(self._entries) > self.keep:
            self._entries.popitem(last=False)
        return entry[1]

    def forget(self, modules: set[nn.Module]) -> None:
        """Drop the packed weights of `modules` (their weights were released, e.g. streamed back to disk)."""
        for module in modules:
            self._entries.pop(module, None)

    def __len__(self) -> int:
        return len(self._entries)


class PackedLinear(nn.Linear):
    """An `nn.Linear` that multiplies through `packed` where it can (see the module docstring).

    Example:
        >>> cache = PackedWeights()
        >>> layer = PackedLinear(576, 1536, bias=False, packed=cache)
        >>> y = layer(x)  # oneDNN on the packed weight; packed again only after the weight changes
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 packed: PackedWeights | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed = packed

    def forward(self, x: Tensor) -> Tensor:
        if self.packed is None or x.dim() < 2 or torch.is_grad_enabled() or onednn_linear_ops() is None:
            return F.linear(x, self.weight, self.bias)
        tensors = (x, self.weight) if self.bias is None else (x, self.weight, self.bias)
        if not plain_fp32_cpu(*tensors):
            return F.linear(x, self.weight, self.bias)
        _, matmul = onednn_linear_ops()
        return matmul(x, self.packed.get(self, x.numel() // x.shape[-1]), self.bias, "none", [], "")
