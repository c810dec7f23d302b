"""Dense Linear layers on sparsetorch's small-batch kernels, in fp32 or bf16.

At batch 1 a dense layer's product is a matrix-vector product bound by the weight's bytes, where
PyTorch's GEMM streams fp32 below the memory's speed and bf16 far below it (it was built for
large batches). `SparseLinear` over a `DenseTensor` runs the rows kernel of `kernels/csrc/dense.h`
for up to 8 batch rows and a GEMM above that; bf16 weights are widened to fp32 in registers, so
activations stay fp32 in decode.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetorch.formats.dense import DenseTensor
from sparsetorch.nn import SparseLinear

__all__ = ["DENSE_DTYPES", "dense_kernels"]

DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dense_kernels(model: nn.Module, dtype: torch.dtype = torch.float32, backend: str = "auto") -> list[str]:
    """Replace every plain `nn.Linear` of `model` by a SparseLinear over its weight in `dtype` (fp32:
    the same tensor, no copy; bf16: a rounded copy). Biases stay fp32.

    Returns:
        The names of the replaced layers.

    Raises:
        ValueError: a dtype other than float32 and bfloat16.

    Example:
        >>> dense_kernels(model, torch.bfloat16)[:1]
        ['model.layers.0.self_attn.qkv_proj']
    """
    if dtype not in DENSE_DTYPES.values():
        raise ValueError(f"dense kernels take float32 or bfloat16 weights, not {dtype}")
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        weight = linear.weight.detach().to(dtype).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float()
        model.set_submodule(name, SparseLinear(DenseTensor(tuple(weight.shape), weight), bias, backend))
    return names
