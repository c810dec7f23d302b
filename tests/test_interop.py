"""compressed-tensors 0.14.0 (the last release with sparse compressors) reads our files,
and we read its files. It lives in its own environment (`make test` builds .venv-ct);
SPARSETORCH_CT_PYTHON points at that environment's python."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.formats.checkpoint import read_compressed_state_dict
from sparsetorch.formats.pruned import load_pruned, save_pruned

CT_PYTHON = os.environ.get("SPARSETORCH_CT_PYTHON")
SIDE = Path(__file__).parent / "interop" / "ct_side.py"
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not CT_PYTHON, reason="set SPARSETORCH_CT_PYTHON to a python with compressed-tensors==0.14.0"),
]


def _ct(*args):
    result = subprocess.run([CT_PYTHON, str(SIDE), *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_tensors_decompresses_our_files_to_the_same_weights(tmp_path, pattern):
    model = tiny_llama(tie=True)
    report = sparsetorch.prune(model, calibration_ids(), method="sparsegpt", pattern=pattern, progress=False)
    out = save_pruned(model, tmp_path / "out", report.to_dict(), codec="none")
    expected = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(expected, tmp_path / "expected.safetensors")
    result = _ct("read", out / "compressed", tmp_path / "expected.safetensors")
    assert result["version"] == "0.14.0"
    assert result["format"] == "sparse-bitmask" and result["structure"] == pattern
    assert result["checked"] == len(expected) and result["mismatched"] == []


def test_we_read_files_written_by_compressed_tensors(tmp_path):
    model = tiny_llama(tie=False)
    sparsetorch.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    directory = tmp_path / "theirs"
    model.save_pretrained(directory)
    (directory / "model.safetensors").rename(directory / "dense.safetensors")
    result = _ct("write", directory, tmp_path / "expected.safetensors")
    assert result["version"] == "0.14.0"
    expected = load_file(tmp_path / "expected.safetensors")
    state, _ = read_compressed_state_dict(directory)
    assert state.keys() == expected.keys()
    assert all(torch.equal(_bits(state[k]), _bits(v)) for k, v in expected.items())
    loaded = load_pruned(directory, compressed=True)
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, expected["model.layers.1.mlp.up_proj.weight"])
    shutil.rmtree(directory)


def _quantized_export(tmp_path, scheme, pattern=None, embeddings=None, tie=False):
    """A tiny Llama rounded to `scheme` (pruned with `pattern` first, if any; its embeddings rounded to
    `embeddings`, if given), exported with codec 'none'."""
    from sparsetorch.formats.checkpoint import write_compressed
    from test_formats_quantized_layers import _quantize_model

    model = tiny_llama(tie=tie)
    layers = []
    if pattern is not None:
        layers = list(sparsetorch.prune(model, None, method="magnitude", pattern=pattern, progress=False).layers)
    grids = _quantize_model(model, scheme, embed_scheme=embeddings)
    write_compressed(model, tmp_path / "ours", layers, structure=pattern or "unstructured", codec="none", grids=grids)
    expected = {k: v.contiguous() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    save_file(expected, tmp_path / "expected.safetensors")
    return tmp_path / "ours"


@pytest.mark.parametrize("name", ["int8", "int8-asym", "int4", "int4-g32", "int4-g32-asym"])
def test_compressed_tensors_reads_our_dense_quantized_weights_exactly(tmp_path, name):
    from sparsetorch.quantize import parse_scheme

    directory = _quantized_export(tmp_path, parse_scheme(name))
    result = _ct("decompress", directory, tmp_path / "expected.safetensors")
    assert result["mismatched"] == [] and result["checked"] == 21
    assert result["dtypes"] == ["torch.float32"]  # float32 scales: it dequantizes in float32 too


def test_compressed_tensors_reads_our_int8_embeddings_stored_once(tmp_path):
    from sparsetorch.quantize import QuantScheme

    directory = _quantized_export(tmp_path, QuantScheme(8), embeddings=QuantScheme(8), tie=True)
    result = _ct("decompress", directory, tmp_path / "expected.safetensors")
    assert result["mismatched"] == [] and result["checked"] == 20 and result["dtypes"] == ["torch.float32"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_tensors_reads_our_sparse_int8_weights_in_half_precision(tmp_path, pattern):
    from sparsetorch.quantize import QuantScheme

    directory = _quantized_export(tmp_path, QuantScheme(8), pattern)
    result = _ct("decompress", directory, tmp_path / "expected.safetensors")
    # its sparse path gives the int8 codes an fp16 scale whatever the file holds: our weights, rounded to fp16
    assert result["mismatched"] == [] and "torch.float16" in result["dtypes"]


@pytest.mark.parametrize("name", ["int4-g32", "int8-asym"])
def test_compressed_tensors_refuses_sparse_combinations_it_cannot_read(tmp_path, name):
    from sparsetorch.quantize import parse_scheme

    directory = _quantized_export(tmp_path, parse_scheme(name), "unstructured")
    result = _ct("decompress", directory, tmp_path / "expected.safetensors")
    assert f"sparsetorch-bitmask-{name}" in result["error"]  # refused by name, never misread
