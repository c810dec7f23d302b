"""Writing safetensors files piece by piece (`formats/safetensors_writer.py`) and reading a directory's
shards by tensor name (`formats/sharded.py`)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsetorch.formats.safetensors_writer import PlannedFile, SpooledFile, TensorSpec, save_tensors
from sparsetorch.formats.sharded import ShardedWeights


def _tensors():
    return {
        "b.weight": torch.randn(3, 5),
        "a.weight": torch.randn(4).to(torch.bfloat16),
        "a.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "half": torch.randn(2, 2).half(),
        "empty": torch.zeros(0, 4),
    }


def test_save_tensors_writes_the_bytes_save_file_writes(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    save_tensors(tensors, tmp_path / "ours.safetensors", {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    save_file(tensors, tmp_path / "plain.safetensors")
    save_tensors(tensors, tmp_path / "plain-ours.safetensors")
    assert (tmp_path / "plain-ours.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_planned_file_takes_tensors_in_any_order(tmp_path):
    tensors = _tensors()
    specs = {name: TensorSpec.of(tensor) for name, tensor in tensors.items()}
    with PlannedFile(tmp_path / "planned.safetensors", specs, {"format": "pt"}) as out:
        for name in reversed(list(tensors)):
            out.write(name, tensors[name])
    save_tensors(tensors, tmp_path / "whole.safetensors", {"format": "pt"})
    assert (tmp_path / "planned.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_planned_file_refuses_a_wrong_tensor_and_a_missing_one(tmp_path):
    out = PlannedFile(tmp_path / "x.safetensors", {"w": TensorSpec(torch.float32, (2, 3)),
                                                   "v": TensorSpec(torch.float32, (1,))})
    with pytest.raises(ValueError, match=r"w: planned torch.float32 \(2, 3\), got torch.float32 \(3, 2\)"):
        out.write("w", torch.zeros(3, 2))
    out.write("w", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="1 planned tensors never written"):
        out.close()


def test_spooled_file_lays_out_what_save_tensors_does_and_removes_its_spool(tmp_path):
    tensors = _tensors()
    spooled = SpooledFile(tmp_path / "spooled.safetensors", {"format": "pt"})
    for name, tensor in tensors.items():
        spooled.add(name, tensor)
    with pytest.raises(ValueError, match="already written"):
        spooled.add("mask", tensors["mask"])
    spooled.metadata["extra"] = "set before close"
    spooled.close()
    save_tensors(tensors, tmp_path / "whole.safetensors", {"format": "pt", "extra": "set before close"})
    assert (tmp_path / "spooled.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".spool")] == []
    assert torch.equal(load_file(tmp_path / "spooled.safetensors")["b.weight"], tensors["b.weight"])


def test_sharded_weights_read_by_name_across_shards(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"b": torch.arange(3, dtype=torch.int32)}, tmp_path / "two.safetensors")
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with ShardedWeights(tmp_path) as weights:
        assert sorted(weights.keys()) == ["a", "b"] and "a" in weights
        assert weights.spec("b") == TensorSpec(torch.int32, (3,))
        assert torch.equal(weights.tensor("a", torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))
        assert weights.nbytes() == 2 * 4 + 3 * 4
        with pytest.raises(KeyError, match="stores no tensor 'c'"):
            weights.tensor("c")


def test_sharded_weights_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no safetensors weights"):
        ShardedWeights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        ShardedWeights(tmp_path)
