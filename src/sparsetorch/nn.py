"""Drop-in modules that hold only compressed weights.

`SparseLinear` computes `x W^T + b` like `nn.Linear`, but keeps W in one of the formats of
`sparsetorch.formats` (N:M packed, bitmask or csr16, or any of them holding quantized codes,
`QuantizedTensor`) and multiplies with the kernels of `sparsetorch.kernels`: no dense weight and
no dense mask exist at run time. In fp32 the result equals the dense layer's to rounding (a
different summation order); a quantized weight's equals that of its dequantized weight.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from sparsetorch.formats.base import SparseWeight
from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.nm import NMTensor, find_nm
from sparsetorch.formats.registry import get_format
from sparsetorch.kernels.dispatch import bind_kernel, check_backend, kernel_name
from sparsetorch.kernels.registry import Run
from sparsetorch.targets import weight_matrix

__all__ = ["SparseLinear", "compress"]


def compress(dense: Tensor, fmt: str = "auto") -> SparseWeight:
    """A dense (out, in) weight with zeros in the format `fmt`.

    Args:
        fmt: 'nm' (the sparsest N:M pattern it fits: 2:4, 4:8, 1:4 ...), 'bitmask', 'csr16',
            or 'auto' ('nm' if the weight is 2:4, else 'bitmask').

    Raises:
        ValueError: 'nm' for a weight that fits no N:M pattern.

    Example:
        >>> compress(torch.tensor([[0., 2., 3., 0.]]), "nm").values
        tensor([[2., 3.]])
    """
    dense = dense.detach()
    if fmt in ("nm", "auto"):
        nm = find_nm(dense)
        if nm is not None and (fmt == "nm" or nm == (2, 4)):
            return NMTensor.from_dense(dense, *nm)
        if fmt == "nm":
            raise ValueError(f"the weight of shape {tuple(dense.shape)} fits no N:M pattern; use 'bitmask' or 'csr16'")
        return BitmaskTensor.from_dense(dense)
    return get_format(fmt).from_dense(dense)


class SparseLinear(nn.Module):
    """`nn.Linear` with a compressed weight.

    Args:
        weight: the compressed (out, in) weight.
        bias: (out,) or None.
        backend: 'auto', an ISA name ('avx512', 'avx2', 'scalar') or 'torch' (see `sparsetorch.kernels`).

    Example:
        >>> layer = SparseLinear.from_linear(pruned_linear, "nm")
        >>> torch.testing.assert_close(layer(x), pruned_linear(x))
    """

    def __init__(self, weight: SparseWeight, bias: Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        check_backend(backend)
        self.out_features, self.in_features = weight.shape
        self.format = weight.FORMAT
        self.backend = backend
        for name, tensor in weight.parts().items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._weight = weight
        self._runs: dict[tuple, Run] = {}

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: str = "auto", backend: str = "auto") -> SparseLinear:
        """Compress a pruned `nn.Linear` (or GPT-2 `Conv1D`) into a SparseLinear; the Linear is not changed."""
        bias = getattr(linear, "bias", None)
        return cls(compress(weight_matrix(linear), fmt), None if bias is None else bias.detach().clone(), backend)

    @property
    def sparse_weight(self) -> SparseWeight:
        """The compressed weight (its tensors are this module's buffers)."""
        return self._weight

    def kernel(self, x: Tensor) -> str:
        """Which kernel serves inputs like `x`: 'cuda', 'avx512', 'avx2', 'scalar' or 'torch'."""
        return kernel_name(self._weight, x, self.backend)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()  # (batch, in)
        return self._run(flat)(flat, self.bias).view(*x.shape[:-1], self.out_features)

    def _run(self, flat: Tensor) -> Run:
        key = (flat.device, flat.dtype)
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = bind_kernel(self._weight, flat, self.backend)
        return run

    def rows_function(self, like: Tensor) -> Callable[[Tensor], Tensor]:
        """`f(x) -> y` for contiguous (rows, in) inputs of `like`'s device and dtype, straight to the bound
        kernel: no module call, reshape or lookup (a decode step's plan calls it, `models.step`).
        Forward hooks do not run through it."""
        run, bias = self._run(like.new_empty(1, self.in_features)), self.bias
        return lambda x: run(x, bias)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        parts = {name: buffer for name, buffer in self.named_buffers(recurse=False)}
        self._weight = self._weight.with_parts(parts)
        self._runs = {}
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"density={self._weight.density:.1%}, bias={self.bias is not None}")
