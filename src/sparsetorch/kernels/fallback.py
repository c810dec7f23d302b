"""Pure-PyTorch kernels: correct everywhere, fast nowhere.

They serve when no C++ kernel can (no compiler, another dtype, a layout the C++ code does not
cover, quantized values): each weight is expanded (and dequantized) a block of rows at a time
and multiplied with `F.linear`, so no full dense weight ever exists and the result matches the
dense layer to rounding.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.csr16 import Csr16Tensor
from sparsetorch.formats.dense import DenseTensor
from sparsetorch.formats.nm import NMTensor
from sparsetorch.formats.quantized import QUANTIZED_KERNEL_FORMATS
from sparsetorch.kernels.registry import TORCH, Run

__all__ = ["ROW_BLOCK_ELEMENTS", "bind_blockwise", "blockwise_linear"]

ROW_BLOCK_ELEMENTS = 1 << 20  # dense elements expanded at a time (4 MB in fp32)


def blockwise_linear(x: Tensor, weight, bias: Tensor | None) -> Tensor:
    """y = x W^T + bias, expanding W a block of rows at a time. x: (batch, in) -> (batch, out)."""
    rows, cols = weight.shape
    step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
    out = x.new_empty(x.shape[0], rows)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = weight.dense_rows(start, stop).to(device=x.device, dtype=x.dtype)  # (stop - start, in)
        out[:, start:stop] = F.linear(x, block, None if bias is None else bias[start:stop])
    return out


def bind_blockwise(weight, isa: str | None = None) -> Run:
    return lambda x, bias: blockwise_linear(x, weight, bias)


for _format in (BitmaskTensor, Csr16Tensor, NMTensor, DenseTensor):
    TORCH.register(_format.FORMAT, "linear")(bind_blockwise)
for _kernel_format in QUANTIZED_KERNEL_FORMATS:  # 'bitmask-int8', 'nm-int4', ...: dequantize a block, multiply
    TORCH.register(_kernel_format, "linear")(bind_blockwise)
