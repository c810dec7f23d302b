"""`sparsetorch bench` and `eval --sparse-runtime` on a tiny pruned model, as a user runs them."""

import json
import subprocess
import sys

import pytest

from sparsetorch.cli import main
from sparsetorch.evaluate.bench import BenchConfig
from test_families import NAMED, _config


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "pruned"
    assert main(["prune", str(tiny_model_dir), "--out", str(out), "--calib-text", str(text_files[0]),
                 "--calib-samples", "4", "--seqlen", "32", "--pattern", "2:4", "--quiet"]) == 0
    return out


def test_bench_compares_dense_and_sparse_in_one_run(pruned_dir, tmp_path, capsys):
    record = tmp_path / "bench.json"
    assert main(["bench", str(pruned_dir), "--prefill-tokens", "16", "--decode-tokens", "6", "--repeats", "1",
                 "--rounds", "1", "--sparse-runtime", "always", "--json", str(record)]) == 0
    printed = capsys.readouterr().out
    assert "| sparse / dense |" in printed and "peak RSS MB" in printed
    assert "greedy tokens identical to the dense model: yes" in printed
    assert "decoder: lean" in printed  # 'auto' on a Llama
    assert "layers sparse (nm: 14)" in printed
    runs = json.loads(record.read_text())
    assert len(runs["dense"]) == len(runs["sparse"]) == 1
    assert runs["sparse"][0]["weight_bytes"]["sparse_linear"] > 0 and runs["dense"][0]["peak_rss_bytes"] > 0


def run_worker(directory, out, variant: str, decoder: str, ids=None) -> dict:
    job = {"directory": str(directory), "variant": variant, "decoder": decoder, "prefill_tokens": 16,
           "decode_tokens": 6, "repeats": 1, "runtime": {"policy": "always"}}
    if ids is not None:
        job["ids"] = json.loads(ids.read_text())
    (tmp := out.with_suffix(".job.json")).write_text(json.dumps(job))
    subprocess.run([sys.executable, "-m", "sparsetorch.evaluate.bench_worker", str(tmp), str(out)], check=True)
    return json.loads(out.read_text())


def test_workers_take_the_ids_tokenized_by_the_parent(pruned_dir, tmp_path):
    from sparsetorch.evaluate.bench_worker import PROMPT, token_ids

    ids = token_ids(pruned_dir, "lean", 16)
    assert len(ids["prefill"]) == 16 and 0 < len(ids["prompt"]) <= len(PROMPT)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    given = run_worker(pruned_dir, tmp_path / "given.json", "sparse", "lean", tmp_path / "ids.json")
    own = run_worker(pruned_dir, tmp_path / "own.json", "sparse", "lean")
    assert given["generated"] == own["generated"] and given["prefill_tokens"] == 16


def test_the_lean_worker_never_imports_transformers_and_decodes_the_same_tokens(pruned_dir, tmp_path):
    lean = {v: run_worker(pruned_dir, tmp_path / f"{v}.json", v, "lean") for v in ("dense", "sparse")}
    reference = run_worker(pruned_dir, tmp_path / "transformers.json", "sparse", "transformers")
    assert [r["transformers_imported"] for r in (*lean.values(), reference)] == [False, False, True]
    assert lean["dense"]["generated"] == lean["sparse"]["generated"] == reference["generated"]
    assert lean["sparse"]["summary"] == reference["summary"] == "14 of 14 layers sparse (nm: 14)"
    ours, theirs = lean["sparse"]["weight_bytes"], reference["weight_bytes"]  # ours stacks q/k/v and gate/up,
    assert {**ours, "sparse_linear": 0} == {**theirs, "sparse_linear": 0}  # one shape record where there were three
    assert 0 < theirs["sparse_linear"] - ours["sparse_linear"] < 0.01 * theirs["sparse_linear"]
    assert 0 < lean["sparse"]["linear_share"] < 1 and lean["sparse"]["decoder"] == "lean"


def test_eval_with_the_sparse_runtime_matches_dense(pruned_dir, text_files, capsys):
    common = ["--eval-text", str(text_files[1]), "--eval-tokens", "256", "--seqlen", "32", "--quiet"]
    assert main(["eval", str(pruned_dir), *common]) == 0
    dense = capsys.readouterr().out.splitlines()[-1].split()[1]
    assert main(["eval", str(pruned_dir), "--sparse-runtime", "always", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "sparse runtime: 14 of 14 layers sparse" in lines[0]
    assert abs(float(lines[-1].split()[1]) - float(dense)) < 1e-3 * float(dense)


def test_bench_refuses_a_directory_without_both_forms(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "bench needs a directory written by `sparsetorch prune`" in capsys.readouterr().err


def test_bench_config_validates():
    with pytest.raises(ValueError, match="decode_tokens must be at least 2"):
        BenchConfig(decode_tokens=1)
    with pytest.raises(ValueError, match="decoder must be one of"):
        BenchConfig(decoder="vllm")


def test_lean_decoder_refuses_an_unsupported_family_with_one_message(tmp_path):
    from sparsetorch.evaluate.bench_worker import resolve_decoder

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert resolve_decoder(tmp_path, "auto") == "transformers"
    with pytest.raises(ValueError, match="decoder 'lean': the lean decoder runs model_type"):
        resolve_decoder(tmp_path, "lean")


@pytest.mark.parametrize("family", NAMED)
def test_bench_runs_every_named_family_with_the_same_greedy_tokens(family, text_files, tmp_path, capsys):
    """Beyond Llama too: GPT-2's Conv1D stores weights transposed, Gemma computes its embedding scale."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import _train_tokenizer
    from sparsetorch.models import own_families

    tokenizer = _train_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path / family
    AutoModelForCausalLM.from_config(_config(family, vocab=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--out", str(out), "--calib-text", str(text_files[0]), "--method", "sparsegpt",
                 "--calib-samples", "4", "--seqlen", "32", "--pattern", "2:4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--prefill-tokens", "16", "--decode-tokens", "6", "--repeats", "1", "--rounds", "1",
                 "--sparse-runtime", "always"]) == 0
    printed = capsys.readouterr().out
    decoder = "lean" if family in own_families() else "transformers"
    assert f"decoder: {decoder}" in printed and "greedy tokens identical to the dense model: yes" in printed
