"""2:4 on CUDA: torch's semi-structured sparse tensors (CUTLASS or cuSPARSELt).

`to_sparse_semi_structured` needs fp16 or bf16 (or int8), an Ampere-or-newer GPU, and
weight dimensions in multiples of its tile; other cases fall to the pure-PyTorch kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetorch.formats.nm import NMTensor
from sparsetorch.kernels.registry import CUDA, Run

__all__ = ["bind_semi_structured", "semi_structured_supported"]

_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_supported(weight: NMTensor, x: Tensor) -> bool:
    """2:4, fp16/bf16 on a CUDA device of compute capability 8.0+, rows % 32 == 0, cols % 64 == 0."""
    rows, cols = weight.shape
    return (
        x.is_cuda
        and weight.values.is_cuda
        and (weight.n, weight.m) == (2, 4)
        and x.dtype in _DTYPES
        and weight.values.dtype == x.dtype
        and rows % 32 == 0
        and cols % 64 == 0
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


@CUDA.register("nm", "linear", supports=semi_structured_supported)
def bind_semi_structured(weight: NMTensor, isa: str | None = None) -> Run:
    from torch.sparse import to_sparse_semi_structured

    compressed = to_sparse_semi_structured(weight.to_dense())  # the dense copy lives only during this call
    return lambda x, bias: F.linear(x, compressed, bias)
