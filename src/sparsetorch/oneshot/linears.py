"""Calibration matmuls through oneDNN, with each weight packed once per version.

torch's float32 `nn.Linear` on CPU calls MKL's sgemm, which packs the weight into its
blocked layout again on every call and zero-fills the output in a pass of its own. A
calibration forward multiplies the same weight by every batch of windows (16 batches of
4 in the benchmark), so inside `packed_linears(model)` each plain `nn.Linear` runs
oneDNN's matmul instead (`torch.ops.mkldnn._linear_pointwise`, shipped with torch) on a
weight reordered once into oneDNN's layout, and
again only when the weight changes: pruning writes it in place (`set_weight_matrix`),
which bumps the tensor's version counter. Measured here on SmolLM2-135M's calibration
products (2048 rows): 205-220 against 188-200 GFLOP/s; a Wanda 2:4 prune of 8 blocks
14.9-15.2 s against 16.5-17.3 s with the same masks, and of the whole model 56-57 s
against 63 s (benchmarks/RESULTS.md). The products equal MKL's to float32 rounding
(another order of accumulation; tested).

Only the packed weights of the last `KEEP` layers used are kept (the pipeline runs one
block at a time), so memory grows by at most that many layers' weights (about two Llama
blocks'). Anything but
float32 CPU tensors outside autocast and autograd goes to the layer's own forward, and
so does everything on a torch build without oneDNN.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from sparsetorch.oneshot.overrides import instance_forward
from sparsetorch.oneshot.precision import plain_fp32_cpu

__all__ = ["KEEP", "PackedWeights", "onednn_linear_ops", "packed_linears"]

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

    def __init__(self, reorder: Callable, keep: int = KEEP) -> None:
        self._reorder = reorder
        self.keep = keep
        self._entries: OrderedDict[nn.Module, tuple[tuple, Tensor]] = OrderedDict()

    def get(self, module: nn.Module, rows: int) -> Tensor:
        """`module.weight` packed for products with about `rows` input rows."""
        weight = module.weight
        stamp = (weight.data_ptr(), weight._version, tuple(weight.shape))
        entry = self._entries.pop(module, None)
        if entry is None or entry[0] != stamp:
            entry = (stamp, self._reorder(weight.detach(), rows))
        self._entries[module] = entry
        while len(self._entries) > self.keep:
            self._entries.popitem(last=False)
        return entry[1]

    def __len__(self) -> int:
        return len(self._entries)


def _packed_forward(module: nn.Linear, packed: PackedWeights, matmul: Callable) -> Callable[[Tensor], Tensor]:
    original = module.forward

    def forward(x: Tensor) -> Tensor:
        tensors = (x, module.weight) if module.bias is None else (x, module.weight, module.bias)
        if x.dim() < 2 or torch.is_grad_enabled() or not plain_fp32_cpu(*tensors):
            return original(x)
        rows = x.numel() // x.shape[-1]
        return matmul(x, packed.get(module, rows), module.bias, "none", [], "")

    return forward


@contextmanager
def packed_linears(model: nn.Module) -> Iterator[None]:
    """Run `model`'s `nn.Linear` layers through oneDNN with packed weights inside the context."""
    ops = onednn_linear_ops()
    if ops is None:
        yield
        return
    reorder, matmul = ops
    packed = PackedWeights(reorder)
    with ExitStack() as stack:
        for module in model.modules():
            if type(module) is nn.Linear:  # subclasses may compute otherwise
                stack.enter_context(instance_forward(module, _packed_forward(module, packed, matmul)))
        yield
