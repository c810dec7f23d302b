import json

import pytest

from sparsetorch.models import load_model, resolve_model_path


def test_hub_id_without_local_copy_says_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face hub id.*never downloads.*--local-dir"):
        resolve_model_path("meta-llama/Llama-3.2-1B")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*corrupt"):
        load_model(tmp_path)


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(tmp_path)


def test_corrupt_weights(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_model_dir.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load the model"):
        load_model(broken)


def test_loads_a_local_directory(tiny_model_dir):
    model, tokenizer, path = load_model(tiny_model_dir)
    assert path == tiny_model_dir and not model.training
    assert tokenizer("hello")["input_ids"]
