"""The command line as a user runs it, on a tiny model with its own tokenizer."""

import json
import subprocess
import sys

import pytest
import torch

from sparsetorch.cli import main


def _prune_args(model_dir, out, calib, *extra):
    return ["prune", str(model_dir), "--out", str(out), "--calib-text", str(calib),
            "--calib-samples", "8", "--seqlen", "64", "--quiet", *extra]


def test_help_reads_well():
    result = subprocess.run([sys.executable, "-m", "sparsetorch.cli", "prune", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--method", "--sparsity", "--pattern", "--calib-samples", "--seqlen", "--out", "--overwrite"):
        assert flag in result.stdout


def test_prune_eval_inspect(tiny_model_dir, text_files, tmp_path, capsys):
    calib, evaluation = text_files
    out = tmp_path / "pruned"
    assert main(_prune_args(tiny_model_dir, out, calib, "--method", "sparsegpt", "--pattern", "2:4")) == 0
    printed = capsys.readouterr().out
    assert "sparsity 50.00%" in printed and f"saved to {out}" in printed
    assert not (tmp_path / "pruned.resume").exists()  # the per-block checkpoint goes once the output is safe
    record = json.loads((out / "sparsity.json").read_text())
    assert record["calibration"]["samples"] == 8 and record["pattern"] == "2:4"

    assert main(["eval", str(out), "--eval-text", str(evaluation), "--eval-tokens", "512",
                 "--seqlen", "64", "--quiet", "--compare"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("perplexity")]
    assert len(lines) == 2 and "sparse/dense" in lines[1]

    assert main(["eval", str(out), "--compressed", "--eval-text", str(evaluation), "--eval-tokens", "512",
                 "--seqlen", "64", "--quiet"]) == 0
    compressed_line = capsys.readouterr().out.splitlines()[-1]
    assert compressed_line.split()[1] == lines[0].split()[1]  # same perplexity from either form

    exported = tmp_path / "exported"
    assert main(["export", str(out), "--out", str(exported)]) == 0
    from sparsetorch.formats.pruned import load_pruned

    a, b = load_pruned(out).state_dict(), load_pruned(exported, compressed=True).state_dict()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert json.loads((exported / "sparsetorch.json").read_text())["codec"] == "none"
    capsys.readouterr()

    assert main(["inspect", str(out), "--plot", str(tmp_path / "heat.png")]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "50.00%" in table
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,message", [
    (["--sparsity", "1.2"], r"sparsity must be in \[0, 1\)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "2:3", "--method", "sparsegpt"], "divisible by 3"),
    (["--method", "obs"], "unknown pruning method 'obs'"),
    (["--pattern", "zigzag"], "unknown pattern 'zigzag'"),
])
def test_bad_input_gives_one_clear_message_and_writes_nothing(tiny_model_dir, text_files, tmp_path, capsys,
                                                              extra, message):
    out = tmp_path / "out"
    assert main(_prune_args(tiny_model_dir, out, text_files[0], *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetorch prune: error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_prune_args(tiny_model_dir, out, text_files[0])) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("model,message", [
    ("org/some-model", "never downloads"),
    ("missing-dir", "does not exist"),
])
def test_bad_model_names_the_problem(tmp_path, text_files, capsys, monkeypatch, model, message):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", model, "--out", "o", "--calib-text", str(text_files[0]), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_short_calibration_text(tiny_model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(_prune_args(tiny_model_dir, tmp_path / "o", short)) == 2
    assert "calibration text is too short" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_family_says_how_to_pass_targets(tmp_path, text_files, capsys):
    from transformers import BertConfig, BertForMaskedLM

    from conftest import _train_tokenizer

    path = tmp_path / "bert"
    tokenizer = _train_tokenizer()
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert main(_prune_args(path, tmp_path / "o", text_files[0])) == 2
    err = capsys.readouterr().err
    assert "no block layout for model type 'bert'" in err and "--blocks" in err and "--targets" in err


def test_demo_options_default_to_the_demo_command_defaults():
    from dataclasses import fields

    from sparsetorch.cli import build_parser
    from sparsetorch.evaluate.demo import DemoOptions

    args = build_parser().parse_args(["demo"])
    assert DemoOptions() == DemoOptions(**{f.name: getattr(args, f.name) for f in fields(DemoOptions)})


@pytest.mark.parametrize(("changes", "message"), [
    ({"seqlen": 1}, "seqlen must be an integer of at least 2, got 1"),
    ({"calib_samples": 0}, "calib_samples must be an integer of at least 1, got 0"),
    ({"eval_tokens": 100, "seqlen": 512}, "eval_tokens must hold at least one window of seqlen=512 tokens, got 100"),
    ({"codec": "gzip"}, "codec must be one of ['zstd', 'none'], got 'gzip'"),
])
def test_demo_options_name_the_bad_value(changes, message):
    from sparsetorch.evaluate.demo import DemoOptions

    with pytest.raises(ValueError) as err:
        DemoOptions(**changes)
    assert str(err.value) == message


def test_demo_rejects_bad_counts_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--decode-tokens", "1", "--out", str(out), "--quiet"]) == 2
    assert "decode_tokens must be an integer of at least 2, got 1" in capsys.readouterr().err
    assert not out.exists()
