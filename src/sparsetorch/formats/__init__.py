"""Compressed storage of sparse weights, and the pruned-model directory."""

from sparsetorch.formats.base import SparseWeight
from sparsetorch.formats.bitmask import BitmaskTensor, CorruptTensorError
from sparsetorch.formats.checkpoint import CorruptFileError, read_compressed_state_dict, write_compressed
from sparsetorch.formats.csr16 import Csr16Tensor
from sparsetorch.formats.dense import DenseTensor
from sparsetorch.formats.nm import NMTensor
from sparsetorch.formats.pruned import load_pruned, read_sparsity, save_pruned
from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.formats.registry import FORMATS, get_format, register_format

__all__ = [
    "FORMATS",
    "BitmaskTensor",
    "CorruptFileError",
    "CorruptTensorError",
    "Csr16Tensor",
    "DenseTensor",
    "NMTensor",
    "QuantizedTensor",
    "SparseWeight",
    "get_format",
    "load_pruned",
    "read_compressed_state_dict",
    "read_sparsity",
    "register_format",
    "save_pruned",
    "write_compressed",
]
