"""Kill `sparsetorch prune` with SIGKILL at 20 moments (calibration, resume writes, the final save), rerun
the same command, and check that nothing half-written survives and the result equals an uninterrupted
run's bit for bit; and two runs into one output at once: one wins, the other says why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsetorch.formats.pruned import load_pruned, verify_dense

LAYERS = 6
# (stream, text that marks the moment, seconds after it): after each block's progress (calibration and the
# resume checkpoint's writes), and after the pruning line (the dense save, the compressed form, the rename)
MOMENTS = [("stderr", f"{k}/{LAYERS}", delay) for k in range(LAYERS) for delay in (0.0, 0.15)] + [
    ("stdout", "pruned ", delay) for delay in (0.0, 0.004, 0.008, 0.012, 0.016, 0.02, 0.025, 0.04)
]


@pytest.fixture(scope="module")
def six_block_model(tmp_path_factory):
    from conftest import _train_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("models") / "six"
    tokenizer = _train_tokenizer()
    torch.manual_seed(0)
    tiny_llama(vocab=len(tokenizer), layers=LAYERS, tie=True).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _command(model: Path, out: Path, calib: Path) -> list[str]:
    return [sys.executable, "-m", "sparsetorch.cli", "prune", str(model), "--out", str(out), "--calib-text", str(calib),
            "--method", "sparsegpt", "--pattern", "2:4", "--calib-samples", "32", "--seqlen", "128"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run_and_kill(command: list[str], stream: str, marker: str, delay: float) -> int:
    """Run `command`, SIGKILL it `delay` s after `marker` appears on `stream` (or let it finish)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    seen = threading.Event()

    def watch(pipe, name):
        text = ""
        for chunk in iter(lambda: pipe.read1(4096), b""):
            text += chunk.decode(errors="replace")
            if name == stream and marker in text:
                seen.set()

    threads = [threading.Thread(target=watch, args=(process.stdout, "stdout"), daemon=True),
               threading.Thread(target=watch, args=(process.stderr, "stderr"), daemon=True)]
    for thread in threads:
        thread.start()
    while process.poll() is None and not seen.wait(0.005):
        pass
    if process.poll() is None:
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    return process.wait()


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    dense = load_file(out / "model.safetensors")
    compressed = load_pruned(out, compressed=True).state_dict()
    return {**{f"dense.{k}": v for k, v in dense.items()}, **{f"compressed.{k}": v for k, v in compressed.items()}}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


@pytest.fixture(scope="module")
def reference(six_block_model, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "o"
    subprocess.run(_command(six_block_model, out, text_files[0]), check=True, capture_output=True, env=_env())
    return _tensors(out)


@pytest.mark.parametrize("stream,marker,delay", MOMENTS, ids=[f"{m}+{d}s" for _, m, d in MOMENTS])
def test_a_kill_at_any_moment_leaves_nothing_half_written_and_the_rerun_equals_an_uninterrupted_run(
        six_block_model, text_files, reference, tmp_path, stream, marker, delay):
    out = tmp_path / "o"
    command = _command(six_block_model, out, text_files[0])
    code = _run_and_kill(command, stream, marker, delay)
    if delay == 0.0:
        assert code == -signal.SIGKILL, "the run ended before the moment it was to be killed at"
    if out.exists():  # killed after the rename: the output must be whole
        verify_dense(out)
        _assert_same(_tensors(out), reference)
        return
    rerun = subprocess.run(command, capture_output=True, text=True, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _assert_same(_tensors(out), reference)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["o"], left  # no staging directory, no resume checkpoint, no lock


@pytest.fixture(scope="module")
def other_model(six_block_model, tmp_path_factory):
    """The same tokenizer and shapes, other weights."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("models") / "other"
    shutil.copytree(six_block_model, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("second_model", ["same", "other"])
def test_two_runs_into_one_output_at_once_one_wins_the_other_says_why(six_block_model, other_model, text_files,
                                                                     reference, tmp_path, second_model):
    out = tmp_path / "o"
    first = subprocess.Popen(_command(six_block_model, out, text_files[0]), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(0.05)
    model = six_block_model if second_model == "same" else other_model
    second = subprocess.run(_command(model, out, text_files[0]), capture_output=True, text=True, env=_env())
    _, first_err = first.communicate()
    assert sorted([first.returncode, second.returncode]) == [0, 2], (first_err[-1000:], second.stderr[-1000:])
    winner_is_first = first.returncode == 0
    loser = second.stderr if winner_is_first else first_err
    assert "is writing" in loser or "already exists" in loser
    if winner_is_first or second_model == "same":
        _assert_same(_tensors(out), reference)
    else:  # the other model won: the output is all of it, none of the first's
        other = tmp_path / "other-reference"
        subprocess.run(_command(other_model, other, text_files[0]), check=True, capture_output=True, env=_env())
        _assert_same(_tensors(out), _tensors(other))
