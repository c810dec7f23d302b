"""CSR with 16-bit column indices: the nonzero values, their columns, and row pointers.

For a dense (rows, cols) weight with cols <= 65536 it stores, under the weight's module prefix:
    <prefix>.shape    int64 [rows, cols]
    <prefix>.values   the nonzeros in row-major order, the weight's dtype
    <prefix>.cols     uint16, each value's column
    <prefix>.row_ptr  int64 (rows + 1,): row r's values are values[row_ptr[r]:row_ptr[r + 1]]
fp32 at sparsity s costs 48 * (1 - s) bits per weight: more than the bitmask's 32 * (1 - s) + 1
below 97% sparsity, but a kernel visits only the nonzeros, never the zero bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.formats.base import CorruptTensorError, SparseWeight, shape_tensor, shape_tuple
from sparsetorch.formats.registry import register_format

__all__ = ["MAX_COLS", "Csr16Tensor"]

MAX_COLS = 1 << 16


@register_format("csr16")
@dataclass(frozen=True)
class Csr16Tensor(SparseWeight):
    """One weight in CSR form with uint16 columns.

    Example:
        >>> t = Csr16Tensor.from_dense(torch.tensor([[0., 2.], [3., 0.]]))
        >>> t.values, t.cols.tolist(), t.row_ptr.tolist()
        (tensor([2., 3.]), [1, 0], [0, 1, 2])
    """

    PARTS = ("shape", "values", "cols", "row_ptr")

    shape: tuple[int, int]
    values: Tensor
    cols: Tensor
    row_ptr: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor) -> Csr16Tensor:
        """Build from a (rows, cols) bool mask and its values in row-major order (what a bitmask stores).

        Raises:
            ValueError: more than 65536 columns, too many for 16-bit indices.
        """
        rows, cols = mask.shape
        if cols > MAX_COLS:
            raise ValueError(f"csr16 indexes columns in 16 bits: {cols} columns is more than {MAX_COLS}; use 'bitmask'")
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
        row_ptr[1:] = mask.sum(dim=1).cumsum(0)
        return cls((rows, cols), values, mask.nonzero()[:, 1].to(torch.uint16), row_ptr)

    def stored_shape(self) -> tuple[int, ...]:
        return (int(self.row_ptr[-1]),)

    def value_span(self, start: int, stop: int) -> tuple[int, int]:
        return int(self.row_ptr[start]), int(self.row_ptr[stop])

    def dense_rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the dense weight, without expanding the others."""
        first, last = self.value_span(start, stop)
        counts = self.row_ptr[start + 1:stop + 1] - self.row_ptr[start:stop]
        row_of = torch.repeat_interleave(torch.arange(stop - start, device=counts.device), counts)
        rows = torch.zeros(stop - start, self.shape[1], dtype=self.values.dtype, device=self.values.device)
        rows[row_of, self.cols[first:last].to(torch.int64)] = self.values[first:last]
        return rows

    def to_dense(self) -> Tensor:
        return self.dense_rows(0, self.shape[0])

    def parts(self) -> dict[str, Tensor]:
        return {"shape": shape_tensor(self.shape), "values": self.values, "cols": self.cols, "row_ptr": self.row_ptr}

    @classmethod
    def from_parts(cls, parts: dict[str, Tensor], name: str = "weight", check: bool = True) -> Csr16Tensor:
        """Build from `parts()` and check them.

        Raises:
            CorruptTensorError: row pointers, columns and values disagree.
        """
        result = cls(shape_tuple(parts["shape"], name), parts["values"], parts["cols"], parts["row_ptr"])
        if check:
            result.check(name)
        return result

    def check(self, name: str) -> None:
        """Raise CorruptTensorError unless row pointers rise to the number of values and columns rise within rows."""
        rows, cols = self.shape
        ptr = self.row_ptr
        if ptr.dtype != torch.int64 or tuple(ptr.shape) != (rows + 1,) or int(ptr[0]) != 0 or bool((ptr.diff() < 0).any()):
            raise CorruptTensorError(f"{name}: row_ptr must be {rows + 1} rising int64 offsets from 0")
        nnz = int(ptr[-1])
        if self.values.dim() != 1 or self.values.numel() != nnz or self.cols.dtype != torch.uint16 or self.cols.numel() != nnz:
            raise CorruptTensorError(f"{name}: row_ptr counts {nnz} values, found {self.values.numel()} values "
                                     f"and {self.cols.numel()} {self.cols.dtype} columns")
        col = self.cols.to(torch.int64)
        same_row = torch.ones(nnz, dtype=torch.bool)
        same_row[ptr[:-1][ptr.diff() > 0]] = False  # the first value of every row may restart
        if nnz and (int(col.max()) >= cols or bool((col.diff() <= 0)[same_row[1:]].any())):
            raise CorruptTensorError(f"{name}: columns are out of range or not rising within a row")
