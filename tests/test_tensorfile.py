"""The plain-read safetensors reader: same tensors as safetensors, and damage detected on open."""

import pytest
import torch
from safetensors.torch import save_file

from sparsetorch.formats.tensorfile import TensorFile, TensorFileError


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.tensor([1, 2, 65535], dtype=torch.int32).to(torch.uint16),
        "d": torch.randn(4).to(torch.bfloat16),
        "e": torch.ones(0, 3),
        "f": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "hi"})
    with open(path, "rb") as handle:
        file = TensorFile(handle)
        assert sorted(file.keys()) == sorted(tensors) and file.metadata["note"] == "hi"
        for key, tensor in tensors.items():
            read = file.tensor(key)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape
            assert read.flatten().view(torch.uint8).tolist() == tensor.flatten().view(torch.uint8).tolist()


def test_truncated_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100)}, path)
    data = path.read_bytes()
    for broken in (data[:-8], b"not a tensor file", data[:8] + b"x" + data[9:]):
        path.write_bytes(broken)
        with open(path, "rb") as handle, pytest.raises(TensorFileError):
            TensorFile(handle)
