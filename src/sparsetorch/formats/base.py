"""What every sparse weight format shares: named parts, prefixed state dicts, size.

A format subclasses `SparseWeight`, lists its tensors in `PARTS`, and implements `parts()`
and `from_parts(parts, name)` (which checks that the parts agree); state dicts, loading
with a clear error for missing tensors, and byte counts come from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["CorruptTensorError", "SparseWeight", "check_joinable", "shape_tensor", "shape_tuple"]


class CorruptTensorError(ValueError):
    """A compressed tensor whose parts do not agree: the file is damaged or was edited."""


def shape_tensor(shape: tuple[int, int]) -> Tensor:
    return torch.tensor(shape, dtype=torch.int64)


def shape_tuple(shape: Tensor, name: str) -> tuple[int, int]:
    """A stored `.shape` part as (rows, cols), checked."""
    values = tuple(int(v) for v in shape.tolist())
    if len(values) != 2 or min(values) < 0:
        raise CorruptTensorError(f"{name}: shape {list(values)} is not a 2-D weight shape")
    return values  # type: ignore[return-value]


def check_joinable(cls: type, weights: Sequence[SparseWeight]) -> None:
    """Raise ValueError unless `weights` are all `cls` with one layout, width and value dtype (`cat_rows`)."""
    if not weights:
        raise ValueError("cat_rows needs at least one weight")
    first = weights[0]
    for weight in weights:
        if (type(weight) is not cls or weight.layout() != first.layout() or weight.shape[1] != first.shape[1]
                or weight.values.dtype != first.values.dtype):
            raise ValueError(f"cannot join the rows of a {type(weight).__name__} {weight.shape} {weight.layout()} "
                             f"to a {cls.__name__} {first.shape} {first.layout()}: formats, layouts, widths "
                             "and value dtypes must agree")


class SparseWeight:
    """Mixin for the frozen dataclasses of `sparsetorch.formats` (see `formats.registry`)."""

    FORMAT: ClassVar[str]
    PARTS: ClassVar[tuple[str, ...]]
    VALUES_PART: ClassVar[str] = "values"  # which of PARTS holds `values`
    shape: tuple[int, int]
    values: Tensor

    @classmethod
    def from_dense(cls, dense: Tensor, *layout):
        """Compress a 2-D weight with zeros; `layout` is what the format needs besides (N:M: n, m).

        Raises:
            ValueError: not 2-D, or the weight does not fit the format.
        """
        if dense.dim() != 2:
            raise ValueError(f"{cls.FORMAT} stores 2-D weights, got shape {tuple(dense.shape)}")
        dense = dense.detach().cpu().contiguous()
        nonzero = dense != 0
        return cls.from_mask(nonzero, dense[nonzero], *layout)

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor, *layout):
        """Build from a (rows, cols) bool mask and its values in row-major order (what a bitmask stores)."""
        raise NotImplementedError

    def layout(self) -> tuple:
        """What `from_mask` takes besides the mask and the values (N:M: n, m)."""
        return ()

    def stored_mask(self) -> Tensor:
        """(rows, cols) bool: where values are stored (an N:M group's kept zeros included)."""
        stored = torch.ones((), dtype=torch.bool, device=self.values.device).expand(tuple(self.values.shape))
        return dataclasses.replace(self, values=stored).to_dense()

    @classmethod
    def cat_rows(cls, weights: Sequence[SparseWeight]) -> SparseWeight:
        """One weight whose rows are those of `weights`, in order: q, k and v as one projection, so a
        decode step makes one kernel call where it made three.

        Raises:
            ValueError: weights of another format, layout, width or value dtype.
        """
        check_joinable(cls, weights)
        mask = torch.cat([w.stored_mask() for w in weights])
        values = torch.cat([w.values.reshape(-1) for w in weights])
        return cls.from_mask(mask, values, *weights[0].layout())

    def parts(self) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def from_parts(cls, parts: dict[str, Tensor], name: str = "weight", check: bool = True):
        raise NotImplementedError

    def with_parts(self, parts: dict[str, Tensor]):
        """The same weight over new tensors (moved or cast copies of `parts()`), unchecked.
        Formats whose parts do not say everything about them (a quantized weight's scheme) override it."""
        return type(self).from_parts(parts, check=False)

    def stored_shape(self) -> tuple[int, ...]:
        """The shape `values` must have for these index tensors (a structure's own parts, values aside)."""
        raise NotImplementedError

    def value_span(self, start: int, stop: int) -> tuple[int, int]:
        """[first, last) of rows [start, stop)'s values in the flat, row-major order of `values`."""
        raise NotImplementedError

    @property
    def kernel_format(self) -> str:
        """The key kernels are registered under (`sparsetorch.kernels.registry`): the format name; a
        quantized weight adds its value type ('bitmask-int8'), so each combination gets its own kernels."""
        return self.FORMAT

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The parts under `<prefix>.<part>` (`prefix` is the module name, without `.weight`)."""
        return {f"{prefix}.{key}": tensor for key, tensor in self.parts().items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str):
        """Read and check the parts stored under `prefix`.

        Raises:
            CorruptTensorError: a part is missing or the parts disagree, naming the tensor.
        """
        missing = [key for key in cls.PARTS if f"{prefix}.{key}" not in tensors]
        if missing:
            raise CorruptTensorError(f"{prefix}: missing {missing} of the {cls.FORMAT} tensors")
        return cls.from_parts({key: tensors[f"{prefix}.{key}"] for key in cls.PARTS}, prefix)

    @property
    def nbytes(self) -> int:
        """Bytes of all parts."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    @property
    def density(self) -> float:
        """Stored values per dense weight (kept zeros included, as in N:M groups)."""
        rows, cols = self.shape
        return self.values.numel() / max(rows * cols, 1)
