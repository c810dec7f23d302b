"""Storage: sparse-bitmask layout, lossless codec, pruned directories, corruption."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.formats import codec
from sparsetorch.formats.bitmask import BitmaskTensor, CorruptTensorError, pack_bits, unpack_bits
from sparsetorch.formats.checkpoint import CorruptFileError, read_compressed_state_dict
from sparsetorch.formats.pruned import load_pruned, read_sparsity, save_pruned


def test_pack_bits_is_little_endian_like_numpy():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, True, True]])
    assert pack_bits(mask).tolist() == [[1, 3]]
    assert torch.equal(unpack_bits(pack_bits(mask), 10), mask)


def test_bitmask_exact_parts_for_a_hand_example():
    dense = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
    t = BitmaskTensor.from_dense(dense)
    assert t.values.tolist() == [2.0, 3.0, 4.0]
    assert t.bitmask.tolist() == [[2], [5]]
    assert t.row_offsets.tolist() == [0, 1]
    parts = t.state_dict("layer")
    assert sorted(parts) == ["layer.bitmask", "layer.compressed", "layer.row_offsets", "layer.shape"]
    assert parts["layer.shape"].tolist() == [2, 3] and parts["layer.shape"].dtype == torch.int64


@pytest.mark.parametrize("shape", [(7, 13), (64, 64), (1, 1)])
def test_bitmask_round_trip_is_bit_exact(shape):
    dense = torch.randn(shape).masked_fill(torch.rand(shape) > 0.4, 0.0)
    back = BitmaskTensor.from_state_dict(BitmaskTensor.from_dense(dense).state_dict("w"), "w").to_dense()
    assert torch.equal(back.view(torch.int32), dense.view(torch.int32))


def test_negative_zero_counts_as_zero():
    back = BitmaskTensor.from_dense(torch.tensor([[-0.0, 1.0]])).to_dense()
    assert back.tolist() == [[0.0, 1.0]]


def test_inconsistent_parts_are_detected():
    parts = BitmaskTensor.from_dense(torch.randn(4, 9) * (torch.rand(4, 9) > 0.5)).state_dict("w")
    short = dict(parts, **{"w.compressed": parts["w.compressed"][:-1]})
    with pytest.raises(CorruptTensorError, match="w: bitmask marks .* nonzeros but"):
        BitmaskTensor.from_state_dict(short, "w")
    offsets = dict(parts, **{"w.row_offsets": parts["w.row_offsets"] + 1})
    with pytest.raises(CorruptTensorError, match="row_offsets"):
        BitmaskTensor.from_state_dict(offsets, "w")
    with pytest.raises(CorruptTensorError, match=r"missing \['bitmask'\]"):
        BitmaskTensor.from_state_dict({k: v for k, v in parts.items() if k != "w.bitmask"}, "w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
def test_codec_round_trip_is_bit_exact(dtype):
    tensor = (torch.randn(33, 17) * 100).to(dtype)
    blob = codec.encode(tensor)
    assert blob.dtype == torch.uint8
    assert torch.equal(codec.decode(blob, dtype, (33, 17)), tensor)


def test_codec_detects_damage():
    blob = codec.encode(torch.randn(1000)).clone()
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="damaged|holds"):
        codec.decode(blob, torch.float32, (1000,))


def test_codec_streams_from_a_file_and_checks_the_length(tmp_path):
    tensor = torch.randn(300, 7)
    path = tmp_path / "blob"
    path.write_bytes(codec.encode(tensor).numpy().tobytes())
    with open(path, "rb") as source:
        assert torch.equal(codec.decode_stream(source, torch.float32, (300, 7)), tensor)
    with pytest.raises(ValueError, match="holds 8400 bytes, expected 9600"), open(path, "rb") as source:
        codec.decode_stream(source, torch.float32, (400, 6))
    with pytest.raises(ValueError, match="holds more than"), open(path, "rb") as source:
        codec.decode_stream(source, torch.float32, (300, 6))
    assert codec.decode(codec.encode(torch.zeros(0)), torch.float32, (0,)).shape == (0,)


def _same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _pruned(tmp_path, codec_name="zstd", tie=True):
    model = tiny_llama(tie=tie)
    report = sparsetorch.prune(model, calibration_ids(), method="sparsegpt", progress=False)
    out = save_pruned(model, tmp_path / "out", report.to_dict(), calibration={"samples": 8}, codec=codec_name)
    return model, report, out


@pytest.mark.parametrize("codec_name", ["zstd", "none"])
@pytest.mark.parametrize("tie", [True, False])
def test_both_forms_load_back_bit_exactly(tmp_path, codec_name, tie):
    model, _, out = _pruned(tmp_path, codec_name, tie)
    expected = model.state_dict()
    for compressed in (False, True):
        loaded = load_pruned(out, compressed=compressed).state_dict()
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert _same_bits(loaded[key], value), (compressed, key)


def test_dense_form_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, out = _pruned(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(out)
    q = plain.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean() == pytest.approx(0.5)
    assert torch.equal(q, model.model.layers[0].self_attn.q_proj.weight)


def test_sparsity_record(tmp_path):
    _, report, out = _pruned(tmp_path)
    record = read_sparsity(out)
    assert record["method"] == "sparsegpt" and record["pattern"] == "unstructured"
    assert record["calibration"] == {"samples": 8}
    assert set(record["layers"]) == set(report.layers)
    layer = record["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["shape"] == [64, 128] and layer["sparsity"] == 0.5 and layer["target_sparsity"] == 0.5
    config = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == "sparse-bitmask"
    assert config["sparsity_config"]["sparsity_structure"] == "unstructured"
    from sparsetorch.formats.checkpoint import sha256_file

    extras = {"source_model": None, "calibration": {"samples": 8},
              "files": {"dense": "model.safetensors", "compressed": "compressed/model.safetensors", "codec": "zstd",
                        "dense_sha256": {"model.safetensors": sha256_file(out / "model.safetensors")}}}
    assert (out / "sparsity.json").read_text() == json.dumps(report.to_dict() | extras, indent=2)


def test_save_pruned_takes_the_report_as_plain_data(tmp_path):
    model, report, _ = _pruned(tmp_path)
    record = report.to_dict()
    save_pruned(model, tmp_path / "second", record)
    assert record == report.to_dict()  # the caller's dict is not extended in place
    with pytest.raises(TypeError, match=r"pass report\.to_dict\(\)"):
        save_pruned(model, tmp_path / "third", report)
    assert not (tmp_path / "third").exists()


def test_compressed_file_is_smaller(tmp_path):
    _, _, out = _pruned(tmp_path, "none", tie=False)
    tensors = load_file(out / "compressed" / "model.safetensors")
    values = tensors["model.layers.0.mlp.up_proj.compressed"]
    assert values.numel() == 128 * 64 // 2
    assert tensors["model.layers.0.mlp.up_proj.bitmask"].shape == (128, 8)


def test_existing_output_is_refused_and_left_alone(tmp_path):
    model, report, out = _pruned(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        save_pruned(model, out, report.to_dict())
    assert sorted(p.name for p in out.iterdir()) == before
    save_pruned(model, out, report.to_dict(), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_leaves_no_partial_output(tmp_path):
    model, report, _ = _pruned(tmp_path)

    def fail(staging):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, tmp_path / "second", report.to_dict(), finish=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_truncated_file_is_detected(tmp_path):
    _, _, out = _pruned(tmp_path)
    path = out / "compressed" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="SHA-256 does not match"):
        load_pruned(out, compressed=True)
    (out / "compressed" / "sparsetorch.json").unlink()  # without checksums, the format checks still catch it
    with pytest.raises(CorruptFileError, match="truncated or not a safetensors file|damaged"):
        load_pruned(out, compressed=True)


def test_flipped_byte_is_detected(tmp_path):
    _, _, out = _pruned(tmp_path, "none")
    path = out / "compressed" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="SHA-256"):
        read_compressed_state_dict(out / "compressed")


def test_edited_tensors_without_manifest_are_caught_by_format_checks(tmp_path):
    _, _, out = _pruned(tmp_path, "none")
    directory = out / "compressed"
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.compressed"] = tensors["model.layers.1.self_attn.k_proj.compressed"][:-3]
    save_file(tensors, directory / "model.safetensors")
    (directory / "sparsetorch.json").unlink()
    with pytest.raises(CorruptFileError, match="k_proj: bitmask marks"):
        read_compressed_state_dict(directory)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pruned(tmp_path / "nope")


@pytest.mark.parametrize("codec_name", ["zstd", "none"])
def test_a_pruned_lm_head_tied_to_the_embedding_is_saved_once_and_loads_back_tied(tmp_path, codec_name):
    model = tiny_llama(tie=True)
    report = sparsetorch.prune(model, calibration_ids(), method="magnitude", ignore=(), progress=False)
    assert "lm_head" in report.layers
    out = save_pruned(model, tmp_path / "out", report.to_dict(), codec=codec_name)
    state, tied = read_compressed_state_dict(out / "compressed")
    assert tied == {"model.embed_tokens.weight": "lm_head.weight"}  # stored once, under the sparse layer's name
    assert "model.embed_tokens.weight" not in state
    expected = model.state_dict()
    for compressed in (False, True):
        loaded = load_pruned(out, compressed=compressed)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert all(_same_bits(loaded.state_dict()[k], v) for k, v in expected.items())


def test_staging_of_dead_runs_is_removed_and_the_output_gets_the_usual_mode(tmp_path):
    import os

    from sparsetorch.formats.checkpoint import atomic_directory

    target = tmp_path / "out"
    dead = tmp_path / ".out.partial-999999999-abc"  # no such process
    live = tmp_path / f".out.partial-{os.getpid()}-xyz"
    dead.mkdir()
    live.mkdir()
    old_mask = os.umask(0o022)
    try:
        with pytest.warns(RuntimeWarning, match="removed 1 staging directory of interrupted runs"):
            with atomic_directory(target) as staging:
                (staging / "f").write_text("x")
    finally:
        os.umask(old_mask)
    assert not dead.exists() and live.exists()
    assert (target / "f").read_text() == "x" and target.stat().st_mode & 0o777 == 0o755


def test_an_output_that_appears_during_the_run_is_not_replaced_without_overwrite(tmp_path):
    from sparsetorch.formats.checkpoint import atomic_directory

    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared during this run"):
        with atomic_directory(target) as staging:
            (staging / "mine").write_text("x")
            target.mkdir()
            (target / "theirs").write_text("y")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left


def test_a_tied_decoder_of_a_bert_model_is_saved_once(tmp_path):
    """BERT's masked-LM decoder shares the word embeddings: pruning it must not break the save."""
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64)).eval()
    report = sparsetorch.prune(model, method="magnitude", targets=["re:.*decoder", "re:.*intermediate.dense"],
                               ignore=(), progress=False)
    out = save_pruned(model, tmp_path / "bert", report.to_dict())
    state, tied = read_compressed_state_dict(out / "compressed")
    assert tied["bert.embeddings.word_embeddings.weight"] == "cls.predictions.decoder.weight"
    assert torch.equal(state["cls.predictions.decoder.weight"], model.cls.predictions.decoder.weight)
    assert BertForMaskedLM.from_pretrained(out).cls.predictions.decoder.weight.eq(0).float().mean() == 0.5
