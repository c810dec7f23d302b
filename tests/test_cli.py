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
    ({"seqlen": 1}, "seqlen must be an integer >= 2, got 1"),
    ({"calib_samples": 0}, "calib_samples must be an integer >= 1, got 0"),
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
    assert "decode_tokens must be an integer >= 2, got 1" in capsys.readouterr().err
    assert not out.exists()


def test_calibration_text_that_is_not_utf8_names_the_byte(tiny_model_dir, text_files, tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(text_files[0].read_bytes()[:3000] + "café".encode("latin-1") + b" and more")
    assert main(_prune_args(tiny_model_dir, tmp_path / "o", latin)) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text: byte 3003 (b'\\xe9')" in err and "iconv" in err
    assert not (tmp_path / "o").exists()


def test_a_directory_as_text_or_a_file_as_model_is_named_for_what_it_is(tiny_model_dir, text_files, tmp_path, capsys):
    assert main(_prune_args(tiny_model_dir, tmp_path / "o", tmp_path)) == 2
    assert "is a directory; pass a UTF-8 text file" in capsys.readouterr().err
    assert main(_prune_args(tiny_model_dir / "config.json", tmp_path / "o", text_files[0])) == 2
    assert "config.json is a file; pass the Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unwritable_output_location_is_refused_before_any_work(tiny_model_dir, text_files, tmp_path, capsys):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        blocker = tmp_path / "a-file"  # root may write anywhere: a file in the path is what it cannot pass
        blocker.write_text("")
        out = blocker / "sub" / "out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    assert main(_prune_args(tiny_model_dir, out, text_files[0])) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "choose another --out" in err


def test_an_interrupt_names_where_the_finished_blocks_are_kept(tiny_model_dir, text_files, tmp_path, capsys,
                                                               monkeypatch):
    from sparsetorch.oneshot import resume

    save = resume.ResumeCheckpoint.save

    def save_then_interrupt(self, index, *args):
        save(self, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(resume.ResumeCheckpoint, "save", save_then_interrupt)
    out = tmp_path / "o"
    assert main(_prune_args(tiny_model_dir, out, text_files[0])) == 130
    err = capsys.readouterr().err
    assert f"its finished blocks are kept in {out}.resume; the same command resumes" in err
    assert "<out>" not in err and not out.exists()


def test_resuming_into_the_same_output_from_another_model_is_refused(tiny_model_dir, text_files, tmp_path, capsys,
                                                                       monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetorch.oneshot import resume

    other = tmp_path / "other-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model.model.embed_tokens.weight.data.normal_()  # the same shapes, other weights
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)

    save = resume.ResumeCheckpoint.save

    def save_then_interrupt(self, index, *args):
        save(self, index, *args)
        raise KeyboardInterrupt

    out = tmp_path / "o"
    with monkeypatch.context() as patch:
        patch.setattr(resume.ResumeCheckpoint, "save", save_then_interrupt)
        assert main(_prune_args(tiny_model_dir, out, text_files[0], "--method", "sparsegpt")) == 130
    capsys.readouterr()
    assert main(_prune_args(other, out, text_files[0], "--method", "sparsegpt")) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of another model" in err and "--restart" in err
    assert not out.exists()
    assert main(_prune_args(tiny_model_dir, out, text_files[0], "--method", "sparsegpt")) == 0  # the same model resumes


def test_a_second_run_into_a_locked_output_fails_clearly_and_leaves_the_first_alone(tiny_model_dir, text_files,
                                                                                      tmp_path, capsys):
    import os

    from sparsetorch.formats.lock import output_lock

    out = tmp_path / "o"
    with output_lock(out) as lock:
        assert lock.read_text() == str(os.getpid())
        assert main(_prune_args(tiny_model_dir, out, text_files[0])) == 2
        err = capsys.readouterr().err
        assert f"another sparsetorch run (pid {os.getpid()}) is writing {out}" in err
        assert not out.exists() and not (tmp_path / "o.resume").exists()
    assert not lock.exists()
    assert main(_prune_args(tiny_model_dir, out, text_files[0])) == 0  # free again


def test_a_damaged_dense_weights_file_is_detected_not_evaluated(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(_prune_args(tiny_model_dir, out, text_files[0])) == 0
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # one flipped bit inside a weight
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    for command in (["eval", str(out), "--eval-text", str(text_files[1]), "--eval-tokens", "256", "--seqlen", "64",
                     "--quiet"], ["inspect", str(out)], ["bench", str(out)]):
        assert main(command) == 2, command
        assert "model.safetensors is damaged: its SHA-256 does not match sparsity.json" in capsys.readouterr().err


def test_inspect_leaves_a_dense_source_directory_untouched(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    assert main(["inspect", str(tiny_model_dir)]) == 0
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    assert (tmp_path / "tiny-llama-sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_not_enough_disk_is_refused_before_any_work(tiny_model_dir, text_files, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert main(_prune_args(tiny_model_dir, tmp_path / "o", text_files[0])) == 2
    err = capsys.readouterr().err
    assert "not enough free disk for" in err and "0.00 GB free" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_owl_allocation_from_the_command_line(tiny_model_dir, text_files, tmp_path):
    out = tmp_path / "o"
    assert main(_prune_args(tiny_model_dir, out, text_files[0], "--sparsity", "0.6", "--allocation", "owl",
                            "--owl-lambda", "0.05")) == 0
    record = json.loads((out / "sparsity.json").read_text())
    targets = sorted({layer["target_sparsity"] for layer in record["layers"].values()})
    assert record["config"]["allocation"] == "owl" and len(targets) == 2  # two blocks, 0.6 ± 0.05
    assert targets == pytest.approx([0.55, 0.65])
