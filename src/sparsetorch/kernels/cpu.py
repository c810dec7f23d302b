"""The C++ kernels (csrc/), registered per format; `isa` picks the build (see build.py).

Batches of fewer than `OUTER_FROM` rows run the rows regime (stream each weight row once and
apply it to every batch row), larger ones the outer regime (x transposed into tiles, one FMA
per stored weight per batch row); see csrc/kernels.h. The switch point is measured
(benchmarks/kernels.py): the rows regime wins for a single row only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.csr16 import MAX_COLS, Csr16Tensor
from sparsetorch.formats.dense import DenseTensor
from sparsetorch.formats.nm import NMTensor
from sparsetorch.kernels.build import load_isa
from sparsetorch.kernels.registry import CPU, Run

__all__ = ["DENSE_ROWS", "OUTER_FROM", "bind_bitmask", "bind_csr16", "bind_dense", "bind_nm"]

OUTER_FROM = 2  # batch rows from which the outer regime runs (at most 9)
DENSE_ROWS = 8  # batch rows up to which a dense weight runs the rows kernel; more go to a GEMM


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


def _dense_fp32_or_bf16(weight: DenseTensor, x: Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.values.dtype in (torch.float32, torch.bfloat16))


@CPU.register("dense", "linear", supports=_dense_fp32_or_bf16)
def bind_dense(weight: DenseTensor, isa: str) -> Run:
    """fp32 x times an fp32 or bf16 weight: the rows kernel for a decode's few rows (csrc/dense.h), a
    GEMM for a prefill's many (bf16 weights meet bf16-rounded activations there, as in llama.cpp)."""
    op, values = load_isa(isa).dense_linear, weight.values.contiguous()

    def run(x: Tensor, bias: Tensor | None) -> Tensor:
        if x.shape[0] <= DENSE_ROWS:
            return op(x, values, bias)
        if values.dtype == torch.float32:
            return F.linear(x, values, bias)
        return F.linear(x.to(values.dtype), values).float() + (0 if bias is None else bias)

    return run
