"""The C++ decode kernels for quantized weights (csrc/quantized.h), registered per kernel format.

fp32 activations, symmetric grids, one scale per output row or per group of a multiple of
`GROUP_MULTIPLE` input columns (a group then holds whole SIMD chunks). Batches of up to 8 rows
stream the weight once; larger ones take one pass per 8 rows. Everything else (asymmetric grids,
other group sizes, other dtypes, structures without a kernel here) goes to the PyTorch fallback,
which dispatch picks when `supports` says no.

The 'avx512vnni' build multiplies int8 activations instead (csrc/quantized_vnni.h) wherever
`takes_int8_activations` says so: x is rounded per block of `ACTIVATION_BLOCK` columns to int8
with a scale per block, exactly as `int8_activations` does in PyTorch, as llama.cpp does for its
Q8_0 and Q4_0 weights. Its result is the dequantized weight times `int8_activations(x)`, to fp32
rounding. The 'avx512' backend keeps x in fp32 on the same CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.kernels.build import load_isa
from sparsetorch.kernels.registry import CPU, Run

__all__ = ["ACTIVATION_BLOCK", "GROUP_MULTIPLE", "bind_bitmask_int4", "bind_bitmask_int8", "bind_dense_int4",
           "bind_dense_int8", "bind_nm_int4", "int8_activations", "takes_int8_activations"]

GROUP_MULTIPLE = 32  # input columns: a group holds whole chunks of every ISA (2:4 chunks span 32 columns)
ACTIVATION_BLOCK = 64  # input columns per int8 activation scale on 'avx512vnni' (one VNNI dot product)


def takes_int8_activations(weight: QuantizedTensor) -> bool:
    """Whether the 'avx512vnni' kernels multiply this weight with `int8_activations(x)`: a format with a
    kernel here, a symmetric grid, one scale per row or groups of whole activation blocks."""
    served = weight.kernel_format in ("dense-int8", "bitmask-int8", "dense-int4", "bitmask-int4") or (
        weight.kernel_format == "nm-int4" and (weight.index.n, weight.index.m) == (2, 4))
    return served and weight.scheme.symmetric and (weight.scheme.group_size or 0) % ACTIVATION_BLOCK == 0


def int8_activations(x: Tensor) -> Tensor:
    """x (batch, in) as the 'avx512vnni' kernels see it: each block of 64 columns rounded (half to
    even) to int8 codes times the block's absmax / 127, back in float32."""
    batch, cols = x.shape
    blocks = -(-cols // ACTIVATION_BLOCK)
    padded = torch.zeros(batch, blocks * ACTIVATION_BLOCK).index_copy_(1, torch.arange(cols), x.float())
    padded = padded.view(batch, blocks, ACTIVATION_BLOCK)
    top = padded.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    codes = torch.round(padded * inverse)
    return (codes * (top / 127.0)).view(batch, -1)[:, :cols]


def _symmetric_fp32(weight: QuantizedTensor, x: Tensor) -> bool:
    """fp32 CPU input, codes on the CPU, a symmetric grid with per-row scales or groups the kernels take."""
    scheme = weight.scheme
    group_ok = scheme.group_size is None or scheme.group_size % GROUP_MULTIPLE == 0
    return (x.dtype == torch.float32 and x.device.type == "cpu" and weight.codes.device.type == "cpu"
            and scheme.symmetric and group_ok)


def _is_2_4(weight: QuantizedTensor, x: Tensor) -> bool:
    return _symmetric_fp32(weight, x) and (weight.index.n, weight.index.m) == (2, 4)


def _scales(weight: QuantizedTensor) -> tuple[Tensor, int]:
    """(the grid's fp16 scales as float32 (out, groups), the group size in columns or 0 for one per row)."""
    return weight.grid.scale.float().contiguous(), weight.scheme.group_size or 0


@CPU.register("dense-int8", "linear", supports=_symmetric_fp32)
def bind_dense_int8(weight: QuantizedTensor, isa: str) -> Run:
    op, codes = load_isa(isa).dense_int8_linear, weight.codes  # int8 (out, in)
    scale, group = _scales(weight)
    return lambda x, bias: op(x, codes, scale, bias, group)


def _bind_bitmask(weight: QuantizedTensor, op) -> Run:
    """A bitmask structure's op over its flat codes (int8 (kept,), or 4-bit two per byte), bits and row offsets."""
    cols, codes, bitmask = weight.shape[1], weight.codes.reshape(-1), weight.index.bitmask  # bits (out, ceil(in / 8))
    offsets = weight.index.row_offsets.to(torch.int64)
    scale, group = _scales(weight)
    return lambda x, bias: op(x, codes, bitmask, offsets, scale, bias, cols, group)


@CPU.register("bitmask-int8", "linear", supports=_symmetric_fp32)
def bind_bitmask_int8(weight: QuantizedTensor, isa: str) -> Run:
    return _bind_bitmask(weight, load_isa(isa).bitmask_int8_linear)


@CPU.register("nm-int4", "linear", supports=_is_2_4)
def bind_nm_int4(weight: QuantizedTensor, isa: str) -> Run:
    op, cols = load_isa(isa).nm24_int4_linear, weight.shape[1]
    codes, indices = weight.codes, weight.index.indices  # uint8 (out * in / 4,), uint8 (out, in / 8)
    scale, group = _scales(weight)
    return lambda x, bias: op(x, codes, indices, scale, bias, cols, group)


@CPU.register("bitmask-int4", "linear", supports=_symmetric_fp32)
def bind_bitmask_int4(weight: QuantizedTensor, isa: str) -> Run:
    return _bind_bitmask(weight, load_isa(isa).bitmask_int4_linear)


@CPU.register("dense-int4", "linear", supports=_symmetric_fp32)
def bind_dense_int4(weight: QuantizedTensor, isa: str) -> Run:
    op, cols = load_isa(isa).dense_int4_linear, weight.shape[1]
    codes = weight.codes.contiguous().view(torch.uint8)  # int32 (out, ceil(in / 8)) -> uint8 (out, 4 ceil(in / 8))
    scale, group = _scales(weight)
    return lambda x, bias: op(x, codes, scale, bias, cols, group)
