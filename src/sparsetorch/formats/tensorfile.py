"""Read a safetensors file one tensor at a time with plain reads, never mapping the file.

`safetensors.safe_open` maps the whole file; every page a read touches then counts in the
process's resident memory until the file is closed, so loading a compressed model that way
holds the compressed bytes next to the decoded weights. This reader copies one tensor's
bytes into its own buffer and nothing else stays resident.

Layout (safetensors): 8-byte little-endian header length N, N bytes of JSON header
({name: {dtype, shape, data_offsets}}, "__metadata__"), then the data the offsets index.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import BinaryIO

import torch
from torch import Tensor

__all__ = ["TensorFile", "TensorFileError"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


class TensorFileError(ValueError):
    """The file is not a safetensors file, or its header does not fit its size."""


class TensorFile:
    """An open safetensors file: `keys()`, `metadata`, `tensor(key)`.

    Raises:
        TensorFileError: on open, a header that is missing, malformed or points past the end.

    Example:
        >>> with open("model.safetensors", "rb") as f:
        ...     weights = TensorFile(f).tensor("lm_head.weight")
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise TensorFileError(f"header length {length} does not fit a file of {size} bytes")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TensorFileError(f"header is not JSON ({err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + length
        for key, entry in header.items():
            self._check(key, entry, size)

    def _check(self, key: str, entry: dict, size: int) -> None:
        try:
            begin, end = entry["data_offsets"]
            itemsize = DTYPES[entry["dtype"]].itemsize
            numel = math.prod(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"tensor {key}: malformed header entry {entry}") from None
        if not 0 <= begin <= end or end - begin != numel * itemsize or self._data_start + end > size:
            raise TensorFileError(f"tensor {key}: bytes {begin}..{end} do not fit its shape or the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """`key`'s dtype and shape, from the header alone."""
        entry = self._entries[key]
        return DTYPES[entry["dtype"]], tuple(entry["shape"])

    def nbytes(self, key: str) -> int:
        """Bytes `key` occupies in the file (for an entropy-coded tensor: its coded size)."""
        begin, end = self._entries[key]["data_offsets"]
        return end - begin

    def open_bytes(self, key: str) -> io.RawIOBase:
        """A read-only file object over `key`'s bytes only, to stream them without loading them all."""
        begin, end = self._entries[key]["data_offsets"]
        return _Range(self._handle, self._data_start + begin, end - begin)

    def tensor(self, key: str) -> Tensor:
        """A fresh tensor holding `key`'s bytes."""
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        self._handle.seek(self._data_start + begin)
        if self._handle.readinto(buffer) != len(buffer):
            raise TensorFileError(f"tensor {key}: the file ends early")
        dtype = DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


class _Range(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a file object of their own."""

    def __init__(self, handle: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._handle, self._position, self._left = handle, start, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = min(len(buffer), self._left)
        if size <= 0:
            return 0
        self._handle.seek(self._position)
        got = self._handle.readinto(memoryview(buffer)[:size])
        self._position += got
        self._left -= got
        return got
