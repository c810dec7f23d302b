"""Lossless entropy coding of tensors: split into byte planes, then zstd.

The bytes of a float tensor are far from random: the sign/exponent byte of trained
weights takes a few dozen values, and weights that were once quantized (any model
dequantized from GGUF or GPTQ) leave whole low-order bytes constant. Grouping byte k of
every value together lets zstd find that structure (the "ZipNN" observation). Decoding
gives back the exact bits; zstd's frame checksum catches a damaged blob.
"""

from __future__ import annotations

import io
import math
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = ["CODECS", "decode", "decode_stream", "dtype_from_name", "encode", "encode_into"]

CODECS: tuple[str, ...] = ("zstd", "none")
_SLICE = 1 << 20  # bytes of one plane decoded at a time
_ZSTD_LEVEL = 3


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise ImportError("the 'zstd' codec needs the zstandard package: pip install zstandard") from None
    return zstandard


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def encode(tensor: Tensor) -> Tensor:
    """Byte-plane + zstd encoding of `tensor` as a 1-D uint8 tensor (`encode_into` an in-memory buffer)."""
    encoded = io.BytesIO()
    encode_into(tensor, encoded)
    return torch.frombuffer(encoded.getbuffer(), dtype=torch.uint8)


def encode_into(tensor: Tensor, target: BinaryIO) -> int:
    """Write the encoding of `tensor` to the binary file `target`; return the bytes written.

    The planes are gathered and compressed a slice at a time, so memory holds the tensor and a
    1 MiB slice: no transposed copy of the whole tensor, and no encoding held in memory at all
    (a streamed prune's largest transient used to be its embedding's).
    """
    values = tensor.detach().contiguous().reshape(-1).view(torch.uint8).view(-1, tensor.element_size())
    compressor = _zstd().ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True, threads=-1)
    start = target.tell()
    with compressor.stream_writer(target, size=values.numel(), closefd=False) as writer:
        for plane in values.unbind(1):
            for begin in range(0, plane.numel(), _SLICE):
                writer.write(plane[begin : begin + _SLICE].contiguous().numpy())
    return target.tell() - start


def decode(blob: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `encode`.

    Raises:
        ValueError: the blob is damaged (checksum) or does not hold `shape` values of `dtype`.
    """
    return decode_stream(blob.numpy(), dtype, shape)


def _fill(reader, buffer: memoryview) -> int:
    filled = 0
    while filled < len(buffer):
        got = reader.readinto(buffer[filled:])
        if not got:
            break
        filled += got
    return filled


def decode_stream(source, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `encode`, reading the zstd data from `source` (a file-like object or a buffer) in
    slices of one byte plane, so memory holds the result and a 1 MiB slice, never the encoded blob
    or a whole plane (a plane of SmolLM2's embedding is 28 MB, the largest transient of a load).

    Raises:
        ValueError: the data is damaged (checksum) or does not hold `shape` values of `dtype`.
    """
    zstandard = _zstd()
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(shape)
    values = torch.empty(count, itemsize, dtype=torch.uint8)  # (values, bytes): plane k is column k
    piece = np.empty(max(1, min(count, _SLICE)), dtype=np.uint8)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=False)
        for k in range(itemsize):
            for start in range(0, count, len(piece)):
                size = min(len(piece), count - start)
                filled = _fill(reader, memoryview(piece)[:size])
                if filled != size:
                    raise ValueError(f"zstd data holds {k * count + start + filled} bytes, expected "
                                     f"{count * itemsize} for {dtype} {list(shape)}")
                values[start:start + size, k] = torch.from_numpy(piece[:size])
        if reader.read(1):  # also where zstd checks the frame's checksum
            raise ValueError(f"zstd data holds more than the {count * itemsize} bytes of {dtype} {list(shape)}")
    except zstandard.ZstdError as err:
        raise ValueError(f"damaged zstd data ({err})") from None
    return values.view(dtype).reshape(shape)
