"""Write a safetensors file one tensor at a time, byte for byte what `safetensors.torch.save_file` writes.

`save_file` needs every tensor in memory at once. A model pruned block by block has one block's
tensors at a time, so its files are written here piece by piece:

- `PlannedFile`: every tensor's dtype and shape is known before any value (a dense model's
  weights, from the source model's headers), so the header is written first and each tensor
  goes straight to its offset when it is ready, in any order.
- `SpooledFile`: sizes are known only once a tensor is encoded (the compressed form's zstd
  streams), so tensors are appended to a spool file beside the output as they come, and `close`
  writes the header and copies them into their places, a few MiB at a time.

Both lay the file out as safetensors does (tensors by dtype, widest first, then by name; header
JSON without spaces, padded with spaces to 8 bytes), and `save_tensors` writes a whole dict that
way. Unlike `save_file`, whose metadata keys come out in a different order in every process, the
metadata keys keep their order, so the same tensors always give the same bytes (and checksums).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from sparsetorch.formats.tensorfile import DTYPES

__all__ = ["PlannedFile", "SpooledFile", "TensorSpec", "plan_layout", "save_tensors"]

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# safetensors orders tensors by dtype, in this order from last to first, then by name
_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_COPY_BYTES = 1 << 22


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype and shape: what a header records before its bytes exist."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))


def plan_layout(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None
                ) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (length and header) and each tensor's offset from the start of the file.

    Raises:
        ValueError: a dtype safetensors cannot store.
    """
    unknown = {name: spec.dtype for name, spec in specs.items() if spec.dtype not in _NAMES}
    if unknown:
        raise ValueError(f"safetensors cannot store {unknown}")
    ordered = sorted(specs, key=lambda name: (-_DTYPE_ORDER.index(_NAMES[specs[name].dtype]), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    begins, position = {}, 0
    for name in ordered:
        spec = specs[name]
        begins[name] = position
        header[name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [position, position + spec.nbytes]}
        position += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + begin for name, begin in begins.items()}


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian, as on every platform torch runs on)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class PlannedFile:
    """A safetensors file whose header is written first; `write(name, tensor)` in any order, then `close()`.

    Example:
        >>> with PlannedFile(path, {"w": TensorSpec(torch.float32, (2, 3))}, {"format": "pt"}) as out:
        ...     out.write("w", torch.zeros(2, 3))
    """

    def __init__(self, path: str | Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None
                 ) -> None:
        self.path, self.specs = Path(path), dict(specs)
        head, self._offsets = plan_layout(self.specs, metadata)
        self._missing = set(self.specs)
        self.bytes_written = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, head, 0)
        os.ftruncate(self._fd, len(head) + sum(spec.nbytes for spec in self.specs.values()))

    def write(self, name: str, tensor: Tensor) -> None:
        """Write `name`'s values at their place.

        Raises:
            KeyError: `name` is not in the plan.
            ValueError: dtype or shape differ from the plan.
        """
        spec = self.specs[name]
        if TensorSpec.of(tensor) != spec:
            raise ValueError(f"{name}: planned {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data, offset = _tensor_bytes(tensor), self._offsets[name]
        self.bytes_written += len(data)
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written
        self._missing.discard(name)

    @property
    def missing(self) -> set[str]:
        """Planned tensors not yet written."""
        return set(self._missing)

    def close(self) -> None:
        """Flush and close.

        Raises:
            RuntimeError: some planned tensors were never written (the file would hold zeros there).
        """
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if self._missing:
            raise RuntimeError(f"{self.path}: {len(self._missing)} planned tensors never written, "
                               f"e.g. {sorted(self._missing)[:3]}")

    def abort(self) -> None:
        """Close without completing (the file is left as it is, for its caller to remove)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PlannedFile:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.abort()


def save_tensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to a safetensors file at `path`, the same bytes every time (see the module docstring).

    Example:
        >>> save_tensors({"w": torch.zeros(2, 3)}, "w.safetensors", {"format": "pt"})
    """
    with PlannedFile(path, {name: TensorSpec.of(tensor) for name, tensor in tensors.items()}, metadata) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)


class SpooledFile:
    """A safetensors file of tensors whose sizes are known only when they come: `add(name, tensor)`
    appends to `<path>.spool`, `close()` writes the file in safetensors' order and removes the spool."""

    def __init__(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        self._where: dict[str, tuple[int, TensorSpec]] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        """Append `name`'s values.

        Raises:
            ValueError: `name` was added before.
        """
        if name in self._where:
            raise ValueError(f"tensor {name} was already written to {self.path}")
        self._where[name] = (self._spool.tell(), TensorSpec.of(tensor))
        self._spool.write(_tensor_bytes(tensor))

    def add_bytes(self, name: str, write: Callable[[BinaryIO], int]) -> int:
        """Append `name` as the uint8 bytes `write(file)` writes there (an encoding streamed straight to
        disk, never whole in memory); return their count.

        Raises:
            ValueError: `name` was added before.
        """
        if name in self._where:
            raise ValueError(f"tensor {name} was already written to {self.path}")
        begin = self._spool.tell()
        count = write(self._spool)
        self._where[name] = (begin, TensorSpec(torch.uint8, (count,)))
        return count

    def close(self) -> None:
        """Write the file (header, then every tensor copied from the spool) and remove the spool."""
        self._spool.close()
        head, offsets = plan_layout({name: spec for name, (_, spec) in self._where.items()}, self.metadata)
        with open(self._spool_path, "rb") as spool, open(self.path, "wb") as out:
            out.write(head)
            for name in sorted(offsets, key=offsets.get):
                begin, spec = self._where[name]
                spool.seek(begin)
                _copy(spool, out, spec.nbytes)
            out.flush()
            os.fsync(out.fileno())
        self._spool_path.unlink()

    def abort(self) -> None:
        """Close without writing the file, and remove the spool."""
        if not self._spool.closed:
            self._spool.close()
        self._spool_path.unlink(missing_ok=True)


def _copy(source, target, count: int) -> None:
    while count:
        chunk = source.read(min(count, _COPY_BYTES))
        if not chunk:
            raise OSError(f"{source.name} ends early")
        target.write(chunk)
        count -= len(chunk)
