"""The `sparse-bitmask` format of compressed-tensors: packed bits plus the nonzero values.

For a dense (rows, cols) weight W it stores, under the weight's module prefix:
    <prefix>.shape        int64 [rows, cols]
    <prefix>.compressed   W's nonzeros in row-major order, W's dtype
    <prefix>.bitmask      uint8 (rows, ceil(cols / 8)); bit j % 8 of byte j // 8 is column j
                          (numpy `packbits(..., bitorder="little")`)
    <prefix>.row_offsets  int64 (rows,), where each row's values start
so files move unchanged between sparsetorch and tools that read compressed-tensors
(its sparse compressors were last released in 0.14.0).

fp32 at sparsity s costs 32 * (1 - s) + 1 bits per weight instead of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.formats.base import CorruptTensorError, SparseWeight, shape_tensor, shape_tuple
from sparsetorch.formats.registry import register_format

__all__ = ["BITMASK_KEYS", "BitmaskTensor", "CorruptTensorError", "pack_bits", "unpack_bits"]

BITMASK_KEYS: tuple[str, ...] = ("shape", "compressed", "bitmask", "row_offsets")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8, little bit order."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `pack_bits`: (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS).ne(0)  # (rows, bytes, 8)
    return bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :cols]


@register_format("bitmask")
@dataclass(frozen=True)
class BitmaskTensor(SparseWeight):
    """One weight in sparse-bitmask form.

    Example:
        >>> t = BitmaskTensor.from_dense(torch.tensor([[0., 2.], [3., 0.]]))
        >>> t.values, t.to_dense()
        (tensor([2., 3.]), tensor([[0., 2.], [3., 0.]]))
    """

    PARTS = BITMASK_KEYS
    VALUES_PART = "compressed"

    shape: tuple[int, int]
    values: Tensor
    bitmask: Tensor
    row_offsets: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor, values: Tensor) -> BitmaskTensor:
        """Build from a (rows, cols) bool mask and its values in row-major order."""
        row_counts = mask.sum(dim=1)
        return cls(
            shape=(mask.shape[0], mask.shape[1]),
            values=values,
            bitmask=pack_bits(mask),
            row_offsets=torch.cumsum(row_counts, 0) - row_counts,
        )

    def stored_shape(self) -> tuple[int, ...]:
        return (int(unpack_bits(self.bitmask, self.shape[1]).sum()),)

    def mask(self) -> Tensor:
        """(rows, cols) bool: where the stored values go."""
        return unpack_bits(self.bitmask, self.shape[1])

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense[self.mask()] = self.values
        return dense

    def value_span(self, start: int, stop: int) -> tuple[int, int]:
        first = int(self.row_offsets[start]) if start < self.shape[0] else self.values.numel()
        last = int(self.row_offsets[stop]) if stop < self.shape[0] else self.values.numel()
        return first, last

    def dense_rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the dense weight, without expanding the others."""
        rows = torch.zeros(stop - start, self.shape[1], dtype=self.values.dtype, device=self.values.device)
        first, last = self.value_span(start, stop)
        rows[unpack_bits(self.bitmask[start:stop], self.shape[1])] = self.values[first:last]
        return rows

    def parts(self) -> dict[str, Tensor]:
        """The four tensors under compressed-tensors' names."""
        return {"shape": shape_tensor(self.shape), "compressed": self.values, "bitmask": self.bitmask,
                "row_offsets": self.row_offsets}

    @classmethod
    def from_parts(cls, parts: dict[str, Tensor], name: str = "weight", check: bool = True) -> BitmaskTensor:
        """Build from `parts()` and check them (bit count vs number of values, row offsets, padding bits).

        Raises:
            CorruptTensorError: the parts disagree, naming the tensor.
        """
        result = cls(shape=shape_tuple(parts["shape"], name), values=parts["compressed"], bitmask=parts["bitmask"],
                     row_offsets=parts["row_offsets"])
        if check:
            result.check(name)
        return result

    def check(self, name: str) -> None:
        """Raise CorruptTensorError unless every part agrees with the others."""
        rows, cols = self.shape
        if self.bitmask.dtype != torch.uint8 or tuple(self.bitmask.shape) != (rows, (cols + 7) // 8):
            raise CorruptTensorError(
                f"{name}: bitmask is {self.bitmask.dtype} {tuple(self.bitmask.shape)}, "
                f"expected uint8 {(rows, (cols + 7) // 8)}"
            )
        mask = unpack_bits(self.bitmask, (cols + 7) // 8 * 8)
        if mask[:, cols:].any():
            raise CorruptTensorError(f"{name}: bitmask has bits set past column {cols}")
        row_counts = mask.sum(dim=1)
        if self.values.dim() != 1 or self.values.numel() != int(row_counts.sum()):
            raise CorruptTensorError(
                f"{name}: bitmask marks {int(row_counts.sum())} nonzeros but {self.values.numel()} values are stored"
            )
        if not torch.equal(self.row_offsets.to(torch.int64), torch.cumsum(row_counts, 0) - row_counts):
            raise CorruptTensorError(f"{name}: row_offsets do not match the bitmask")
