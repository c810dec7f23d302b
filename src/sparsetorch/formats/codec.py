"""Lossless entropy coding of tensors: split into byte planes, then zstd.

The bytes of a float tensor are far from random: the sign/exponent byte of trained
weights takes a few dozen values, and weights that were once quantized (any model
dequantized from GGUF or GPTQ) leave whole low-order bytes constant. Grouping byte k of
every value together lets zstd find that structure (the "ZipNN" observation). Decoding
gives back the exact bits; zstd's frame checksum catches a damaged blob.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CODECS", "decode", "dtype_from_name", "encode"]

CODECS: tuple[str, ...] = ("zstd", "none")
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
    """Byte-plane + zstd encoding of `tensor` as a 1-D uint8 tensor."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    planes = raw.reshape(-1, tensor.element_size()).t().contiguous()  # (itemsize, n)
    compressor = _zstd().ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True, threads=-1)
    blob = compressor.compress(planes.numpy().tobytes())
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def decode(blob: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `encode`.

    Raises:
        ValueError: the blob is damaged (checksum) or does not hold `shape` values of `dtype`.
    """
    zstandard = _zstd()
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob.numpy().tobytes())
    except zstandard.ZstdError as err:
        raise ValueError(f"damaged zstd data ({err})") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for size in shape:
        count *= size
    if len(raw) != count * itemsize:
        raise ValueError(f"zstd data holds {len(raw)} bytes, expected {count * itemsize} for {dtype} {list(shape)}")
    planes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(itemsize, count)
    return planes.t().contiguous().view(dtype).reshape(shape)
