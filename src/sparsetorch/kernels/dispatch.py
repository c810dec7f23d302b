"""Pick the kernel for a weight and an input: CUDA, the best C++ build for this CPU, or PyTorch.

`backend` is 'auto' (the best that serves), an ISA name ('avx512', 'avx2', 'scalar': that
C++ build, an error if this CPU lacks it) or 'torch' (the pure-PyTorch kernels).
"""

from __future__ import annotations

from torch import Tensor

from sparsetorch.kernels import cpu, cpu_quantized, cuda, fallback  # noqa: F401  (their decorators fill the registries)
from sparsetorch.kernels.build import best_loaded_isa
from sparsetorch.kernels.cpu_features import ISAS, supported_isas
from sparsetorch.kernels.registry import CPU, CUDA, TORCH, Run

__all__ = ["BACKENDS", "bind_kernel", "check_backend", "kernel_name"]

BACKENDS: tuple[str, ...] = ("auto", *ISAS, "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend in ISAS and backend not in supported_isas():
        raise ValueError(f"this CPU cannot run the {backend} kernels; it supports {list(supported_isas())}")


def kernel_name(weight, x: Tensor, backend: str = "auto", op: str = "linear") -> str:
    """Which kernel `bind_kernel` picks: 'cuda', an ISA name, or 'torch'."""
    check_backend(backend)
    key = (weight.kernel_format, op)
    if x.is_cuda:
        return "cuda" if key in CUDA and CUDA.get(*key).supports(weight, x) else "torch"
    if backend == "torch" or key not in CPU or not CPU.get(*key).supports(weight, x):
        return "torch"
    return best_loaded_isa(None if backend == "auto" else (backend,)) or "torch"


def bind_kernel(weight, x: Tensor, backend: str = "auto", op: str = "linear") -> Run:
    """`run(x, bias) -> y` for `weight` and inputs like `x` (its device and dtype).

    Raises:
        ValueError: unknown backend, or an ISA this CPU lacks.
        NotImplementedError: no kernel at all for this format and op.

    Example:
        >>> run = bind_kernel(NMTensor.from_dense(w), x)
        >>> y = run(x, bias)  # (batch, in) -> (batch, out)
    """
    name = kernel_name(weight, x, backend, op)
    key = (weight.kernel_format, op)
    if name == "cuda":
        return CUDA.get(*key).bind(weight, None)
    if name == "torch":
        return TORCH.get(*key).bind(weight, None)
    return CPU.get(*key).bind(weight, name)
