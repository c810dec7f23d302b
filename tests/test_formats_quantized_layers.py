"""Pruned directories with quantized layers: saved, loaded back bit-identically, sized, refused off-grid."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparsetorch
from conftest import tiny_llama
from sparsetorch.formats.checkpoint import CorruptFileError, read_compressed_state_dict
from sparsetorch.formats.pruned import load_pruned, read_sparsity, save_pruned
from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.formats.quantized_layers import ct_format, records_from_config
from sparsetorch.quantize import QuantScheme, fake_quantize

INT8 = QuantScheme(8)


def _quantize_model(model: nn.Module, scheme: QuantScheme, embed_scheme: QuantScheme | None = INT8) -> dict:
    """Round every Linear (and the input embedding) to its own grid, in place; return the grids."""
    grids = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight is not model.get_input_embeddings().weight:
                rounded, grids[name] = fake_quantize(module.weight, scheme, module.weight != 0)
                module.weight.copy_(rounded)
        if embed_scheme is not None:
            embedding = model.get_input_embeddings().weight
            rounded, grids["model.embed_tokens"] = fake_quantize(embedding, embed_scheme)
            embedding.copy_(rounded)
    return grids


def _saved(tmp_path, scheme=INT8, tie=True, codec="none", pattern="unstructured"):
    model = tiny_llama(tie=tie)
    report = sparsetorch.prune(model, None, method="magnitude", pattern=pattern, progress=False)
    grids = _quantize_model(model, scheme)
    out = save_pruned(model, tmp_path / "out", report.to_dict(), codec=codec, grids=grids)
    return model, grids, out


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("scheme,tie,codec", [
    (INT8, True, "none"),
    (QuantScheme(4, 32, symmetric=False), False, "zstd"),
    (QuantScheme(4, 32), False, "none"),
    (QuantScheme(8, symmetric=False), True, "zstd"),
], ids=["int8-tied-none", "int4-g32-asym-zstd", "int4-g32-none", "int8-asym-tied-zstd"])
def test_both_forms_load_back_bit_identically(tmp_path, scheme, tie, codec):
    model, _, out = _saved(tmp_path, scheme, tie, codec)
    expected = model.state_dict()
    for compressed in (False, True):
        loaded = load_pruned(out, compressed=compressed)
        assert loaded.state_dict().keys() == expected.keys()
        assert all(_same_bits(loaded.state_dict()[k], v) for k, v in expected.items()), compressed
        if tie:
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    manifest = json.loads((out / "compressed" / "sparsetorch.json").read_text())
    assert manifest["quantized"]["model.layers.0.mlp.up_proj"] == {"structure": "bitmask", "scheme": scheme.name,
                                                                   "dtype": "float32"}
    assert manifest["quantized"]["model.embed_tokens"]["structure"] == "dense"
    assert "lm_head" not in manifest["quantized"] or not tie  # tied: stored once, as the embedding
    assert read_sparsity(out)["quantized"]["model.layers.1.self_attn.o_proj"] == scheme.name


def test_dense_form_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, out = _saved(tmp_path, QuantScheme(4, 32))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert all(_same_bits(plain.state_dict()[k], v) for k, v in model.state_dict().items())


def test_compressed_tensors_config_names_each_group(tmp_path):
    _, grids, out = _saved(tmp_path, INT8, tie=False)
    config = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]
    groups = list(config["config_groups"].values())
    assert config["format"] == "int-quantized" and config["sparsity_config"]["format"] == "sparse-bitmask"
    assert sorted(t for g in groups for t in g["targets"]) == sorted(grids)
    assert groups[0]["weights"]["num_bits"] == 8 and groups[0]["weights"]["strategy"] == "channel"
    tensors = load_file(out / "compressed" / "model.safetensors")
    assert records_from_config({"quantization_config": config}, tensors) == {
        name: {"structure": "bitmask" if "layers" in name else "dense", "scheme": "int8"} for name in grids
    }
    assert ct_format("bitmask", QuantScheme(4, 32)) == "sparsetorch-bitmask-int4-g32"


def test_half_sparse_int8_is_about_five_bits_per_weight(tmp_path):
    _, _, out = _saved(tmp_path, INT8, tie=False)
    tensors = load_file(out / "compressed" / "model.safetensors")
    prefix = "model.layers.0.mlp.up_proj"  # (128, 64), 50% sparse
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix + "."))
    assert tensors[f"{prefix}.compressed"].dtype == torch.int8
    # a byte per kept value (half of them), a bit of mask per weight, an int64 offset and a float32 scale
    # per row, the shape: 6.5 bits per weight over these 64 columns, 5.05 over 2048
    assert stored == 128 * 64 // 2 + 128 * 64 // 8 + 128 * 8 + 128 * 4 + 16
    dense = load_file(out / "model.safetensors")
    assert (out / "compressed" / "model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size / 4
    assert dense[f"{prefix}.weight"].dtype == torch.float32


def test_int4_layers_are_packed_two_per_byte(tmp_path):
    _, _, out = _saved(tmp_path, QuantScheme(4, 32), tie=False)
    tensors = load_file(out / "compressed" / "model.safetensors")
    values = tensors["model.layers.0.mlp.up_proj.compressed"]
    assert values.dtype == torch.uint8 and values.numel() == 128 * 64 // 2 // 2
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].shape == (128, 2)


def test_weights_off_their_grid_are_refused_and_nothing_is_written(tmp_path):
    model = tiny_llama()
    report = sparsetorch.prune(model, None, method="magnitude", progress=False)
    grids = _quantize_model(model, INT8)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: weight\[0, 0\] .* quantize the weights first"):
        save_pruned(model, tmp_path / "out", report.to_dict(), grids=grids)
    assert not (tmp_path / "out").exists()


def test_damaged_quantized_tensors_are_detected(tmp_path):
    _, _, out = _saved(tmp_path, QuantScheme(4, 32), tie=False)
    directory = out / "compressed"
    tensors = load_file(directory / "model.safetensors")
    key = "model.layers.1.self_attn.k_proj.compressed"
    tensors[key] = tensors[key][:-3]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CorruptFileError, match="SHA-256"):
        read_compressed_state_dict(directory)
    (directory / "sparsetorch.json").unlink()  # the records come from config.json then; the checks still run
    with pytest.raises(CorruptFileError, match=r"k_proj: the index stores \d+ values, so its int4-g32 codes"):
        read_compressed_state_dict(directory)


def test_load_sparse_model_runs_quantized_layers_on_their_codes(tmp_path):
    from sparsetorch.nn import SparseLinear
    from sparsetorch.runtime.config import RuntimeConfig
    from sparsetorch.runtime.loader import load_sparse_model

    model, _, out = _saved(tmp_path, QuantScheme(4, 32, symmetric=False), tie=True)
    loaded, report = load_sparse_model(out, RuntimeConfig(policy="always", backend="torch"))
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, SparseLinear) and isinstance(layer.sparse_weight, QuantizedTensor)
    assert layer.sparse_weight.kernel_format == "bitmask-int4"
    # the tied embedding stays a tensor for its lookups; the tied lm_head runs on the embedding's int8 codes
    assert {d.chosen for d in report.decisions} == {"bitmask-int4", "dense", "dense-int8"}
    assert isinstance(loaded.lm_head, SparseLinear) and loaded.lm_head.sparse_weight.kernel_format == "dense-int8"
    assert isinstance(loaded.model.embed_tokens.weight, torch.nn.Parameter)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_inspect_shows_the_stored_bits_per_weight(tmp_path):
    from sparsetorch.evaluate.inspect import format_table, layer_sparsity

    _, _, out = _saved(tmp_path, QuantScheme(4, 32), tie=False)
    rows = {r.name: r for r in layer_sparsity(out)}
    # half the weights at 4 bits, 1 bit of mask, per row an int64 offset and two float32 scales over 64 columns
    assert rows["model.layers.0.mlp.up_proj"].bits == pytest.approx(4 * 0.5 + 1 + (64 + 2 * 32) / 64 + 16 * 8 / 8192)
    table = format_table(list(rows.values()))
    assert "bits/w" in table.splitlines()[0] and "50.00%" in table


def test_grids_read_back_write_the_same_file(tmp_path):
    from sparsetorch.formats.checkpoint import read_grids, write_compressed

    model, grids, out = _saved(tmp_path, QuantScheme(4, 32, symmetric=False), tie=False)
    back = read_grids(out / "compressed")
    assert back.keys() == grids.keys()
    for name, grid in grids.items():
        assert back[name].scheme == grid.scheme and torch.equal(back[name].scale, grid.scale)
        assert (grid.zero_point is None) == (back[name].zero_point is None)
        assert grid.zero_point is None or torch.equal(back[name].zero_point, grid.zero_point)
    layers = list(read_sparsity(out)["layers"])
    write_compressed(model, tmp_path / "again", layers, codec="none", grids=back)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "compressed" / "model.safetensors").read_bytes()


def test_grids_for_modules_the_model_lacks_are_refused(tmp_path):
    from sparsetorch.formats.checkpoint import write_compressed

    model = tiny_llama()
    grid = fake_quantize(model.lm_head.weight, INT8)[1]
    with pytest.raises(ValueError, match=r"grids name modules without a weight in this model: \['model.lm_head'\]"):
        write_compressed(model, tmp_path / "c", [], grids={"model.lm_head": grid})


def test_a_2_of_4_bitmask_weight_moves_to_the_2_of_4_structure_code_for_code():
    from conftest import nm_weight
    from sparsetorch.quantize import find_grid

    weight = nm_weight(6, 64, 2, 4)
    weight[0, :4] = 0.0  # a group with nothing kept: the 2:4 structure keeps two zero slots there
    for scheme in (QuantScheme(4, 32), QuantScheme(8)):
        stored = QuantizedTensor.from_dense(weight, find_grid(weight, scheme, weight != 0), "bitmask")
        moved = stored.restructured("nm", 2, 4)
        assert moved.kernel_format == f"nm-int{scheme.bits}" and moved.scheme == scheme
        assert torch.equal(moved.to_dense(), stored.to_dense())
    asymmetric = QuantizedTensor.from_dense(weight, find_grid(weight, QuantScheme(4, 32, symmetric=False)), "bitmask")
    with pytest.raises(ValueError, match="only symmetric grids"):
        asymmetric.restructured("nm", 2, 4)
    dense = torch.randn(4, 64)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        QuantizedTensor.from_dense(dense, find_grid(dense, QuantScheme(4, 32)), "bitmask").restructured("nm", 2, 4)


def test_a_2_of_4_int4_model_runs_the_2_of_4_kernels(tmp_path):
    from sparsetorch.runtime.config import RuntimeConfig
    from sparsetorch.runtime.loader import load_sparse_model

    model, _, out = _saved(tmp_path, QuantScheme(4, 32), tie=False, pattern="2:4")
    loaded, report = load_sparse_model(out, RuntimeConfig(policy="always"))
    assert loaded.model.layers[0].mlp.down_proj.sparse_weight.kernel_format == "nm-int4"
    assert {d.chosen for d in report.decisions} >= {"nm-int4"} and "bitmask-int4" not in {d.chosen for d in report.decisions}
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
