"""The trivial index structure: every position stored, for a weight with sparsity 0.

    <prefix>.weight   (rows, cols), the weight's dtype (or integer codes, see `formats.quantized`)

A plain weight needs no format; this one exists so that a dense weight with quantized values
goes through the same code as the sparse structures (dense int8 / int4 is a candidate too),
and so that its codes sit under compressed-tensors' name for them, `<prefix>.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.formats.base import CorruptTensorError, SparseWeight
from sparsetorch.formats.registry import register_format

__all__ = ["DenseTensor"]


@register_format("dense")
@dataclass(frozen=True)
class DenseTensor(SparseWeight):
    """One weight with every entry stored, zeros included.

    Example:
        >>> DenseTensor.from_dense(torch.tensor([[0., 2.]])).values
        tensor([[0., 2.]])
    """

    PARTS = ("weight",)
    VALUES_PART = "weight"

    shape: tuple[int, int]
    values: Tensor  # (rows, cols)

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor) -> DenseTensor:
        """Build from a (rows, cols) bool mask and its values in row-major order; the rest are zeros."""
        dense = torch.zeros(mask.shape, dtype=values.dtype)
        dense[mask] = values
        return cls((mask.shape[0], mask.shape[1]), dense)

    def dense_rows(self, start: int, stop: int) -> Tensor:
        return self.values[start:stop]

    def to_dense(self) -> Tensor:
        return self.values

    def stored_shape(self) -> tuple[int, ...]:
        return self.shape

    def value_span(self, start: int, stop: int) -> tuple[int, int]:
        cols = self.shape[1]
        return start * cols, stop * cols

    def parts(self) -> dict[str, Tensor]:
        return {"weight": self.values}

    @classmethod
    def from_parts(cls, parts: dict[str, Tensor], name: str = "weight", check: bool = True) -> DenseTensor:
        """Build from `parts()`.

        Raises:
            CorruptTensorError: the weight is not 2-D.
        """
        values = parts["weight"]
        if values.dim() != 2:
            raise CorruptTensorError(f"{name}: weight has shape {tuple(values.shape)}, expected 2-D")
        return cls((values.shape[0], values.shape[1]), values)
