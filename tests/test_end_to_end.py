"""End to end on the bundled SmolLM2-135M-Instruct and Shakespeare text (a few windows)."""

import copy
import json

import pytest
import torch

from sparsetorch import prune
from sparsetorch.cli import main
from sparsetorch.data import demo_text, evaluation_windows
from sparsetorch.evaluate.perplexity import perplexity
from sparsetorch.formats.pruned import load_pruned, read_sparsity
from sparsetorch.models import bundled_gguf, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    try:
        bundled_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_model(None, progress=False)


def test_prune_the_bundled_model_and_load_both_forms(bundled, tmp_path, capsys):
    model, tokenizer, _ = bundled
    out = tmp_path / "smollm2-24"
    assert main(["prune", "--method", "sparsegpt", "--pattern", "2:4", "--calib-samples", "4",
                 "--seqlen", "128", "--out", str(out), "--quiet"]) == 0
    assert "compressed weights" in capsys.readouterr().out
    record = read_sparsity(out)
    assert len(record["layers"]) == 30 * 7 and record["sparsity"] == pytest.approx(0.5)
    assert record["calibration"]["source"] in ("shakespeare", "pydoc_data.topics")

    windows = evaluation_windows(tokenizer, demo_text().evaluation, 2048, 256)
    dense_ppl = perplexity(model, windows, progress=False)
    pruned = load_pruned(out)
    sparse_ppl = perplexity(pruned, windows, progress=False)
    magnitude = copy.deepcopy(model)
    prune(magnitude, method="magnitude", pattern="2:4", progress=False)
    magnitude_ppl = perplexity(magnitude, windows, progress=False)
    # 2:4 costs quality, but four calibration windows already make SparseGPT far better than magnitude.
    assert dense_ppl < sparse_ppl < min(8 * dense_ppl, magnitude_ppl / 2), (dense_ppl, sparse_ppl, magnitude_ppl)

    compressed = load_pruned(out, compressed=True)
    for (name, a), (_, b) in zip(pruned.state_dict().items(), compressed.state_dict().items()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    dense_bytes = (out / "model.safetensors").stat().st_size
    compressed_bytes = (out / "compressed" / "model.safetensors").stat().st_size
    assert compressed_bytes < 0.55 * dense_bytes


def test_demo_writes_report_and_prints_the_comparison(bundled, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "wanda", "--calib-samples", "2", "--seqlen", "64", "--eval-tokens", "256",
                 "--decode-tokens", "4", "--reconstruct", "layer", "--recover-steps", "2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    stack = "wanda 50% + layer reconstruction"
    assert "| dense |" in printed and f"| {stack}, one-shot |" in printed and str(out) in printed
    assert f"| {stack} + 2 recovery steps |" in printed and "layers sparse" in printed
    assert f"| {stack} + 2 recovery steps + sparse kernels |" in printed
    recovery = json.loads((out / "sparsity.json").read_text())["recovery"]
    assert recovery["steps"] == 2 and set(recovery["perplexity"]) == {"before", "after"}
    for name in ("report.md", "report.png", "sparsity.png", "sparsity.json", "model.safetensors"):
        assert (out / name).exists(), name
    assert "perplexity" in (out / "report.md").read_text()
