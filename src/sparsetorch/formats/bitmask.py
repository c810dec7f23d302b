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

__all__ = ["BITMASK_KEYS", "BitmaskTensor", "CorruptTensorError", "pack_bits", "unpack_bits"]

BITMASK_KEYS: tuple[str, ...] = ("shape", "compressed", "bitmask", "row_offsets")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class CorruptTensorError(ValueError):
    """A compressed tensor whose parts do not agree: the file is damaged or was edited."""


def pack_bits(mask: Tensor) -> Tensor:
    """(rows, cols) bool -> (rows, ceil(cols / 8)) uint8, little bit order."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `pack_bits`: (rows, ceil(cols / 8)) uint8 -> (rows, cols) bool."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS).ne(0)  # (rows, bytes, 8)
    return bits.reshape(packed.shape[0], -1)[:, :cols]


@dataclass(frozen=True)
class BitmaskTensor:
    """One weight in sparse-bitmask form.

    Example:
        >>> t = BitmaskTensor.from_dense(torch.tensor([[0., 2.], [3., 0.]]))
        >>> t.values, t.to_dense()
        (tensor([2., 3.]), tensor([[0., 2.], [3., 0.]]))
    """

    shape: tuple[int, int]
    values: Tensor
    bitmask: Tensor
    row_offsets: Tensor

    @classmethod
    def from_dense(cls, dense: Tensor) -> BitmaskTensor:
        if dense.dim() != 2:
            raise ValueError(f"sparse-bitmask stores 2-D weights, got shape {tuple(dense.shape)}")
        dense = dense.detach().cpu().contiguous()
        nonzero = dense != 0
        row_counts = nonzero.sum(dim=1)
        return cls(
            shape=(dense.shape[0], dense.shape[1]),
            values=dense[nonzero],
            bitmask=pack_bits(nonzero),
            row_offsets=torch.cumsum(row_counts, 0) - row_counts,
        )

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense[unpack_bits(self.bitmask, self.shape[1])] = self.values
        return dense

    @property
    def nbytes(self) -> int:
        parts = (self.values, self.bitmask, self.row_offsets)
        return sum(t.numel() * t.element_size() for t in parts) + 16

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The four tensors under compressed-tensors' names (`prefix` without `.weight`)."""
        return {
            f"{prefix}.shape": torch.tensor(self.shape, dtype=torch.int64),
            f"{prefix}.compressed": self.values,
            f"{prefix}.bitmask": self.bitmask,
            f"{prefix}.row_offsets": self.row_offsets,
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str) -> BitmaskTensor:
        """Read and check the four tensors of `prefix`.

        Raises:
            CorruptTensorError: a part is missing, or the parts disagree (bit count vs
                number of values, row offsets, padding bits), naming the tensor.
        """
        missing = [key for key in BITMASK_KEYS if f"{prefix}.{key}" not in tensors]
        if missing:
            raise CorruptTensorError(f"{prefix}: missing {missing} of the sparse-bitmask tensors")
        shape = tuple(int(v) for v in tensors[f"{prefix}.shape"].tolist())
        result = cls(
            shape=shape,  # type: ignore[arg-type]
            values=tensors[f"{prefix}.compressed"],
            bitmask=tensors[f"{prefix}.bitmask"],
            row_offsets=tensors[f"{prefix}.row_offsets"],
        )
        result.check(prefix)
        return result

    def check(self, name: str) -> None:
        """Raise CorruptTensorError unless every part agrees with the others."""
        rows, cols = self.shape if len(self.shape) == 2 else (-1, -1)
        if rows < 0 or cols < 0:
            raise CorruptTensorError(f"{name}: shape {list(self.shape)} is not a 2-D weight shape")
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
