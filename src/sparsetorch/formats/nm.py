"""N:M packed: the n kept values of every group of m inputs, and their positions in the group.

For a dense (rows, cols) weight with at most n nonzeros in every group of m consecutive
columns it stores, under the weight's module prefix:
    <prefix>.shape    int64 [rows, cols]
    <prefix>.nm       int64 [n, m]
    <prefix>.values   (rows, cols / m * n), the weight's dtype: each group's n values in column order
    <prefix>.indices  uint8 (rows, ceil(cols / m * n * bits / 8)): each value's position in its group,
                      `bits = index_bits(m)` bits each, packed little-endian (value k of a row at bit
                      k * bits), so 2:4 spends 2 bits per kept value
A group with fewer than n nonzeros keeps zeros at its first free positions, so every group
holds exactly n values. fp32 2:4 costs 16 + 1 = 17 bits per weight instead of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.formats.base import CorruptTensorError, SparseWeight, shape_tensor, shape_tuple
from sparsetorch.formats.registry import register_format

__all__ = ["NM_CANDIDATES", "NMTensor", "find_nm", "index_bits", "pack_indices", "unpack_indices"]

NM_CANDIDATES: tuple[tuple[int, int], ...] = ((2, 4), (1, 4), (4, 8), (2, 8), (1, 8))


def index_bits(m: int) -> int:
    """Bits per in-group index: the smallest of 1, 2, 4, 8 that counts to m - 1."""
    for bits in (1, 2, 4, 8):
        if m <= 1 << bits:
            return bits
    raise ValueError(f"N:M groups of m={m} do not fit 8-bit indices; use m <= 256")


def pack_indices(indices: Tensor, bits: int) -> Tensor:
    """(rows, k) small integers -> (rows, ceil(k * bits / 8)) uint8, value j at bit j * bits."""
    per_byte = 8 // bits
    rows, k = indices.shape
    padded = torch.zeros(rows, -(-k // per_byte) * per_byte, dtype=torch.uint8)
    padded[:, :k] = indices
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (padded.view(rows, -1, per_byte) << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_indices(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `pack_indices`: (rows, bytes) uint8 -> (rows, k) int64."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, bytes, per_byte)
    return fields.reshape(packed.shape[0], packed.shape[1] * per_byte)[:, :k].to(torch.int64)


@register_format("nm")
@dataclass(frozen=True)
class NMTensor(SparseWeight):
    """One weight in N:M packed form.

    Example:
        >>> t = NMTensor.from_dense(torch.tensor([[0., 0., 3., 4., 5., 0., 0., 8.]]), 2, 4)
        >>> t.values, unpack_indices(t.indices, 2, 4)
        (tensor([[3., 4., 5., 8.]]), tensor([[2, 3, 0, 3]]))
    """

    PARTS = ("shape", "nm", "values", "indices")

    shape: tuple[int, int]
    n: int
    m: int
    values: Tensor
    indices: Tensor

    @classmethod
    def from_dense(cls, dense: Tensor, n: int = 2, m: int = 4) -> NMTensor:
        """Compress a weight with at most n nonzeros in every group of m columns.

        Raises:
            ValueError: not 2-D, cols not divisible by m, not 0 < n < m, or a group with more than n nonzeros.
        """
        return super().from_dense(dense, n, m)

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor, n: int = 2, m: int = 4) -> NMTensor:
        """Build from a (rows, cols) bool mask and its values in row-major order (what a bitmask stores).

        Raises:
            ValueError: cols not divisible by m, not 0 < n < m, or a group with more than n nonzeros.
        """
        rows, cols = _check_nm_shape(mask, n, m)
        groups = mask.view(rows, cols // m, m)
        crowded = groups.sum(dim=-1) > n
        if crowded.any():
            row, group = (int(i) for i in crowded.nonzero()[0])
            raise ValueError(
                f"not {n}:{m} sparse: row {row}, columns {group * m}..{group * m + m - 1} hold "
                f"{int(groups[row, group].sum())} nonzeros, more than {n}"
            )
        # Nonzeros first, then the first free positions; kept positions in column order, so the
        # nonzeros keep their row-major order and `values` drops straight into their slots.
        order = (~groups).to(torch.int64) * m + torch.arange(m)
        keep = order.argsort(dim=-1)[..., :n].sort(dim=-1).values  # (rows, groups, n)
        slots = torch.zeros(keep.shape, dtype=values.dtype)
        slots[groups.gather(-1, keep)] = values
        indices = pack_indices(keep.reshape(rows, -1).to(torch.uint8), index_bits(m))
        return cls((rows, cols), n, m, slots.reshape(rows, -1), indices)

    def positions(self, start: int = 0, stop: int | None = None) -> Tensor:
        """(rows, groups, n) int64 in-group positions of rows [start, stop)."""
        stop = self.shape[0] if stop is None else stop
        flat = unpack_indices(self.indices[start:stop], index_bits(self.m), self.values.shape[1])
        return flat.view(stop - start, self.values.shape[1] // self.n, self.n)

    def dense_rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the dense weight, without expanding the others."""
        cols = self.shape[1]
        rows = torch.zeros(stop - start, cols // self.m, self.m, dtype=self.values.dtype, device=self.values.device)
        values = self.values[start:stop].view(stop - start, cols // self.m, self.n)
        return rows.scatter_(-1, self.positions(start, stop).to(rows.device), values).view(stop - start, cols)

    def to_dense(self) -> Tensor:
        return self.dense_rows(0, self.shape[0])

    def stored_shape(self) -> tuple[int, ...]:
        return self.shape[0], self.shape[1] // self.m * self.n

    def layout(self) -> tuple:
        return self.n, self.m

    def value_span(self, start: int, stop: int) -> tuple[int, int]:
        kept = self.shape[1] // self.m * self.n
        return start * kept, stop * kept

    def parts(self) -> dict[str, Tensor]:
        return {"shape": shape_tensor(self.shape), "nm": torch.tensor([self.n, self.m]), "values": self.values,
                "indices": self.indices}

    @classmethod
    def from_parts(cls, parts: dict[str, Tensor], name: str = "weight", check: bool = True) -> NMTensor:
        """Build from `parts()` and check them.

        Raises:
            CorruptTensorError: shapes disagree, or an index is out of its group or repeated.
        """
        shape = shape_tuple(parts["shape"], name)
        nm = parts["nm"].tolist()
        if len(nm) != 2 or not 0 < nm[0] < nm[1] or shape[1] % nm[1]:
            raise CorruptTensorError(f"{name}: N:M {nm} does not fit a weight of shape {list(shape)}")
        result = cls(shape, int(nm[0]), int(nm[1]), parts["values"], parts["indices"])
        if check:
            result.check(name)
        return result

    def check(self, name: str) -> None:
        """Raise CorruptTensorError unless values and indices fit the shape and every group's positions rise."""
        rows, cols = self.shape
        kept = cols // self.m * self.n
        packed_bytes = -(-kept * index_bits(self.m) // 8)
        if tuple(self.values.shape) != (rows, kept):
            raise CorruptTensorError(f"{name}: values are {tuple(self.values.shape)}, expected {(rows, kept)}")
        if self.indices.dtype != torch.uint8 or tuple(self.indices.shape) != (rows, packed_bytes):
            raise CorruptTensorError(
                f"{name}: indices are {self.indices.dtype} {tuple(self.indices.shape)}, expected uint8 {(rows, packed_bytes)}"
            )
        positions = self.positions()
        if rows and kept and (int(positions.max()) >= self.m or not bool((positions.diff(dim=-1) > 0).all())):
            raise CorruptTensorError(f"{name}: in-group indices are out of range or not increasing")


def find_nm(dense: Tensor, candidates: tuple[tuple[int, int], ...] = NM_CANDIDATES) -> tuple[int, int] | None:
    """The first (n, m) of `candidates` whose every group of m columns holds at most n nonzeros, or None.

    Example:
        >>> find_nm(torch.tensor([[0., 0., 3., 4., 5., 0., 0., 8.]]))
        (2, 4)
    """
    if dense.dim() != 2 or dense.numel() == 0:
        return None
    nonzero = dense != 0
    for n, m in candidates:
        if dense.shape[1] % m == 0 and int(nonzero.view(dense.shape[0], -1, m).sum(dim=-1).max()) <= n:
            return n, m
    return None


def _check_nm_shape(dense: Tensor, n: int, m: int) -> tuple[int, int]:
    if dense.dim() != 2:
        raise ValueError(f"N:M stores 2-D weights, got shape {tuple(dense.shape)}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    index_bits(m)
    if dense.shape[1] % m:
        raise ValueError(f"N:M {n}:{m} needs the input dimension divisible by {m}, got {dense.shape[1]}")
    return dense.shape[0], dense.shape[1]
