"""The C++ kernels (csrc/), registered per format; `isa` picks the build (see build.py).

Batches of fewer than `OUTER_FROM` rows run the rows regime (stream each weight row once and
apply it to every batch row), larger ones the outer regime (x transposed into tiles, one FMA
per stored weight per batch row); see csrc/kernels.h. The switch point is measured
(benchmarks/kernels.py): the rows regime wins for a single row only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.csr16 import MAX_COLS, Csr16Tensor
from sparsetorch.formats.nm import NMTensor
from sparsetorch.kernels.build import load_isa
from sparsetorch.kernels.registry import CPU, Run

__all__ = ["OUTER_FROM", "bind_bitmask", "bind_csr16", "bind_nm"]

OUTER_FROM = 2  # batch rows from which the outer regime runs (at most 9)


def _fp32(weight, x: Tensor) -> bool:
    return x.dtype == torch.float32 and weight.values.dtype == torch.float32 and x.device.type == "cpu"


@CPU.register("bitmask", "linear", supports=_fp32)
def bind_bitmask(weight: BitmaskTensor, isa: str) -> Run:
    op, cols = load_isa(isa).bitmask_linear, weight.shape[1]
    values, bitmask, offsets = weight.values, weight.bitmask, weight.row_offsets.to(torch.int64)
    return lambda x, bias: op(x, values, bitmask, offsets, bias, cols, OUTER_FROM)


@CPU.register("csr16", "linear", supports=lambda w, x: _fp32(w, x) and w.shape[1] <= MAX_COLS)
def bind_csr16(weight: Csr16Tensor, isa: str) -> Run:
    op, cols = load_isa(isa).csr16_linear, weight.shape[1]
    values, columns, row_ptr = weight.values, weight.cols, weight.row_ptr
    return lambda x, bias: op(x, values, columns, row_ptr, bias, cols, OUTER_FROM)


@CPU.register("nm", "linear", supports=lambda w, x: _fp32(w, x) and (w.n, w.m) == (2, 4))
def bind_nm(weight: NMTensor, isa: str) -> Run:
    op, cols = load_isa(isa).nm24_linear, weight.shape[1]
    values, indices = weight.values, weight.indices
    return lambda x, bias: op(x, values, indices, bias, cols, OUTER_FROM)
