"""Compressed storage of sparse weights, and the pruned-model directory."""

from sparsetorch.formats.bitmask import BitmaskTensor, CorruptTensorError
from sparsetorch.formats.checkpoint import CorruptFileError, read_compressed_state_dict, write_compressed
from sparsetorch.formats.pruned import load_pruned, read_sparsity, save_pruned

__all__ = [
    "BitmaskTensor",
    "CorruptFileError",
    "CorruptTensorError",
    "load_pruned",
    "read_compressed_state_dict",
    "read_sparsity",
    "save_pruned",
    "write_compressed",
]
