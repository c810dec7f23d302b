"""The steps after a pruning method, through `sparsetorch.prune`: DSnoT refinement, layer and block reconstruction."""

import copy

import pytest
import torch

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.targets import weight_matrix


def _logit_error(model, dense, ids) -> float:
    """Mean squared distance of the pruned model's logits to the dense model's on `ids`."""
    with torch.no_grad():
        return float((model(ids).logits - dense(ids).logits).square().mean())


def _check_masks(model, report) -> None:
    modules = dict(model.named_modules())
    for name, keep in report.masks.items():
        weight = weight_matrix(modules[name])
        assert torch.equal(weight != 0, keep | (weight != 0)) and not weight[~keep].any(), name
        assert report.layers[name].sparsity == pytest.approx(report.layers[name].target_sparsity, abs=1e-2)


def test_options_are_checked():
    with pytest.raises(ValueError, match="refine must be one of"):
        PruneConfig(refine="grow")
    with pytest.raises(ValueError, match="reconstruct must be one of"):
        PruneConfig(reconstruct="model")
    with pytest.raises(ValueError, match="swaps single weights"):
        PruneConfig(refine="dsnot", pattern="block-4x4")
    assert PruneConfig().refine is None and PruneConfig().reconstruct is None  # the papers' methods by default


def test_steps_need_calibration_even_for_magnitude():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration"):
        sparsetorch.prune(model, None, method="magnitude", refine="dsnot", progress=False)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_each_step_keeps_the_pattern_and_lowers_the_error(method, pattern):
    dense = tiny_llama().eval()
    ids = calibration_ids(windows=8, tokens=32)
    errors = {}
    for step in [{}, {"refine": "dsnot"}, {"reconstruct": "layer"}, {"refine": "dsnot", "reconstruct": "block"}]:
        model = copy.deepcopy(dense)
        report = sparsetorch.prune(model, ids, method=method, pattern=pattern, sparsity=0.5 if ":" not in pattern
                                   else None, progress=False, **step)
        _check_masks(model, report)
        errors[tuple(step.items())] = _logit_error(model, dense, ids)
    plain = errors[()]
    assert errors[(("reconstruct", "layer"),)] < plain  # least squares on the support beats the method's own weights
    assert errors[(("refine", "dsnot"), ("reconstruct", "block"))] < plain


def test_block_reconstruction_is_reported_and_conv1d_layers_fit():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128)).eval()
    dense = copy.deepcopy(model)
    ids = calibration_ids(windows=8, tokens=32)
    report = sparsetorch.prune(model, ids, method="wanda", sparsity=0.5, reconstruct="block", progress=False)
    _check_masks(model, report)
    blocks = report.to_dict()["blocks"]
    assert set(blocks) == {"0", "1"}
    assert all(fit["loss_after"] <= fit["loss_before"] for fit in blocks.values())
    assert _logit_error(model, dense, ids) > 0


def test_block_reconstruction_needs_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match="reconstruct='block'"):
        sparsetorch.prune(model, torch.randn(4, 16), method="wanda", targets=["re:.*"], reconstruct="block",
                          progress=False)
    report = sparsetorch.prune(model, torch.randn(4, 16), method="wanda", targets=["re:.*"], reconstruct="layer",
                               progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)


def test_cli_records_the_steps(tiny_model_dir, text_files, tmp_path):
    import json

    from sparsetorch.cli import main

    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--out", str(out), "--calib-text", str(text_files[0]),
                 "--calib-samples", "8", "--seqlen", "64", "--quiet", "--method", "wanda", "--refine", "dsnot",
                 "--reconstruct", "block"]) == 0
    record = json.loads((out / "sparsity.json").read_text())
    assert record["config"]["refine"] == "dsnot" and record["config"]["reconstruct"] == "block"
    assert record["blocks"] and all(fit["loss_after"] <= fit["loss_before"] for fit in record["blocks"].values())
