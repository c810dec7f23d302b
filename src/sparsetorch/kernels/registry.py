"""Kernel registries: one per backend, keyed by (format, op), filled by decorators.

The format key is the weight's `kernel_format`: its format name ('bitmask', 'nm', 'csr16'), or
for quantized values the structure and value type ('bitmask-int8', 'nm-int4'), so a kernel for
one combination is added without touching the others.

    @CPU.register("nm", "linear", supports=is_2_4)
    def nm_linear(weight, isa):          # bind once per weight, device and dtype ...
        return lambda x, bias: ...       # ... and run on every call: (batch, in) -> (batch, out)

Binding first keeps per-call Python work to one call, and lets a backend prepare the weight
once (the CUDA kernel converts it to a semi-structured tensor there). A backend is a place
kernels run: `CPU` (the C++ kernels, one build per ISA), `TORCH` (pure-PyTorch fallbacks that
run anywhere) and `CUDA`. Registering a key twice is an error; asking for a key nobody
registered raises NotImplementedError with the stub to write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["CPU", "CUDA", "TORCH", "Bind", "Kernel", "KernelRegistry", "Run"]

Run = Callable[[Tensor, "Tensor | None"], Tensor]  # (x (batch, in), bias) -> (batch, out)
Bind = Callable[[object, "str | None"], Run]  # (weight format, isa) -> Run


def _always(weight, x: Tensor) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """A registered kernel and the predicate that says which weights and inputs it takes."""

    bind: Bind
    supports: Callable[[object, Tensor], bool]


class KernelRegistry:
    """Kernels of one backend keyed by (format, op)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._kernels: dict[tuple[str, str], Kernel] = {}

    def register(self, fmt: str, op: str, supports: Callable[[object, Tensor], bool] = _always):
        """Decorator: register `bind(weight, isa) -> run(x, bias)` as this backend's kernel for (fmt, op).

        Args:
            supports: `(weight, x) -> bool`, False where the kernel cannot serve (dtype, shape, N:M).

        Raises:
            ValueError: (fmt, op) is already registered for this backend.
        """

        def decorator(bind: Bind) -> Bind:
            key = (fmt, op)
            if key in self._kernels:
                raise ValueError(f"{self.backend} kernel for {key} is already registered by "
                                 f"{self._kernels[key].bind.__qualname__}")
            self._kernels[key] = Kernel(bind, supports)
            return bind

        return decorator

    def get(self, fmt: str, op: str) -> Kernel:
        """The kernel for (fmt, op).

        Raises:
            NotImplementedError: none is registered; the message shows the decorator to write.
        """
        try:
            return self._kernels[(fmt, op)]
        except KeyError:
            raise NotImplementedError(
                f"no {self.backend} kernel for format {fmt!r}, op {op!r}; register one with\n"
                f"    @sparsetorch.kernels.registry.{self.backend.upper()}.register({fmt!r}, {op!r})\n"
                f"    def {fmt}_{op}(weight, isa): return lambda x, bias: ..."
            ) from None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._kernels

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._kernels)


CPU = KernelRegistry("cpu")
TORCH = KernelRegistry("torch")
CUDA = KernelRegistry("cuda")
