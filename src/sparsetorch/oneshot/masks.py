"""The keep masks of a pruning run, held as bits.

Masks are data: a run hands every layer's mask back in its report. As bool tensors they take a
byte per weight, a quarter of the float32 weights they describe (half of bfloat16 ones), which on
its own pushes a pruning run's memory well past the model's. Packed eight to a byte they take an
eighth of that; a mask is unpacked whenever it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from torch import Tensor

from sparsetorch.formats.bitmask import pack_bits, unpack_bits

__all__ = ["PackedMasks"]


class PackedMasks(MutableMapping[str, Tensor]):
    """layer name -> keep mask (a bool tensor), stored as packed bits.

    Example:
        >>> masks = PackedMasks()
        >>> masks["fc"] = torch.tensor([[True, False, True]])
        >>> masks["fc"]
        tensor([[ True, False,  True]])
    """

    def __init__(self) -> None:
        self._packed: dict[str, tuple[Tensor, torch.Size]] = {}

    def __setitem__(self, name: str, keep: Tensor) -> None:
        rows = keep.shape[0] if keep.dim() > 1 else 1
        cols = keep.numel() // rows if rows else 0
        flat = keep.detach().bool().reshape(rows, cols)
        packed = pack_bits(flat) if flat.numel() else torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8)
        self._packed[name] = (packed, keep.shape)

    def __getitem__(self, name: str) -> Tensor:
        packed, shape = self._packed[name]
        cols = shape.numel() // packed.shape[0] if packed.shape[0] else 0
        return unpack_bits(packed, cols).reshape(shape).contiguous()

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __repr__(self) -> str:
        return f"PackedMasks({list(self._packed)})"
