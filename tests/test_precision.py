"""Calibration precision: bf16 statistics forwards where asked; fp32 block outputs, sums and solvers always."""

from functools import partial

import pytest
import torch
from torch import nn

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.kernels.cpu_features import has_native_bf16
from sparsetorch.models.llama import LeanLlama
from sparsetorch.oneshot import pipeline
from sparsetorch.oneshot.capture import calibration_model
from sparsetorch.oneshot.stats import Gram
from sparsetorch.precision import calibration_dtype, calibration_precision


def test_calibration_dtype_choices():
    fp32, bf16 = nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16)
    assert calibration_dtype(fp32, "model") == torch.float32
    assert calibration_dtype(fp32, "bfloat16") == torch.bfloat16
    assert calibration_dtype(fp32, "auto") == (torch.bfloat16 if has_native_bf16() else torch.float32)
    assert calibration_dtype(bf16, "auto") == calibration_dtype(bf16, "model") == torch.bfloat16
    with pytest.raises(ValueError, match=r"calib_dtype must be one of \['model', 'bfloat16', 'auto'\]"):
        sparsetorch.PruneConfig(calib_dtype="fp16")


def test_gram_under_autocast_is_the_fp32_sum():
    """Inside a bf16 forward, the Gram of the activations it hands over is summed in fp32."""
    torch.manual_seed(0)
    batches = [torch.randn(256, 48).to(torch.bfloat16) for _ in range(8)]
    exact, inside = Gram(48), Gram(48)
    for x in batches:
        exact.add_batch(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside.add_batch(x)
    assert inside.value.dtype == torch.float32
    assert torch.equal(inside.value, exact.value)
    rows = torch.cat(batches).double()
    torch.testing.assert_close(exact.value.double(), rows.t() @ rows, rtol=1e-5, atol=1e-4)


def test_bf16_calibration_is_refused_where_it_has_no_statistics_forward():
    with pytest.raises(ValueError, match="layer_inputs='pruned' has none"):
        sparsetorch.PruneConfig(calib_dtype="bfloat16", layer_inputs="pruned")
    sparsetorch.PruneConfig(calib_dtype="auto", layer_inputs="pruned")  # 'auto': bf16 only where it applies


def _linear_output_dtypes(monkeypatch, calib_dtype, layer_inputs="dense"):
    """The dtypes each target Linear produced during calibration, by layer name, in the model the
    pipeline runs (sparsetorch's own, over the transformers model's weights)."""
    torch.manual_seed(0)
    model = tiny_llama()
    seen, handles, runners = {}, [], []

    def record(name, module, args, output):
        seen.setdefault(name, set()).add(output.dtype)

    def hooked(*args, **kwargs):
        runner, targets = calibration_model(*args, **kwargs)
        runners.append(runner)
        handles.extend(module.register_forward_hook(partial(record, name)) for name, module in targets.items())
        return runner, targets

    monkeypatch.setattr(pipeline, "calibration_model", hooked)
    report = sparsetorch.prune(model, calibration_ids(), method="sparsegpt", pattern="2:4", calib_dtype=calib_dtype,
                               layer_inputs=layer_inputs, progress=False)
    for handle in handles:
        handle.remove()
    assert len(runners) == 1 and isinstance(runners[0], LeanLlama)
    # every target's products were seen (the last block's down_proj may not run: its output feeds nothing)
    assert {name for name in report.layers if ".layers.1." not in name} <= seen.keys()
    return seen, model, report


@pytest.mark.parametrize("layer_inputs", ["dense", "mixed"])
def test_bf16_calibration_runs_only_the_statistics_forward_in_bf16(layer_inputs, monkeypatch):
    """The dense block's matmuls run in bf16; the pruned block's, which make the next
    block's inputs, in fp32; the weights stay fp32."""
    seen, model, report = _linear_output_dtypes(monkeypatch, "bfloat16", layer_inputs)
    for name, dtypes in seen.items():
        if ".layers.1." in name:  # the last block: 'dense' needs no outputs from it
            continue
        if name.endswith("down_proj"):  # no statistics forward runs past its input
            assert dtypes == {torch.float32}, name
        else:
            assert dtypes == {torch.bfloat16, torch.float32}, name
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(layer.sparsity == 0.5 for layer in report.layers.values())
    assert not torch.is_autocast_enabled("cpu")  # the context is left behind

    fp32_seen, _, fp32_report = _linear_output_dtypes(monkeypatch, "model", layer_inputs)
    assert set().union(*fp32_seen.values()) == {torch.float32}
    agree = [(report.masks[n] == fp32_report.masks[n]).float().mean() for n in report.masks]
    assert sum(agree) / len(agree) > 0.9  # the rounding of activations moves only near-tied weights


def test_solvers_run_in_full_precision_inside_a_calibration_forward():
    """SparseGPT under bf16 autocast would round its Hessian inverse; `full_precision` keeps
    the solve bit-identical to one run outside any autocast."""
    layer = nn.Linear(64, 32)
    stat = Gram(64)
    stat.add_batch(torch.randn(512, 64))
    results = []
    for autocast in (False, True):
        model = nn.Sequential(nn.Linear(64, 32))
        model[0].load_state_dict(layer.state_dict())
        pruner_config = sparsetorch.PruneConfig(method="sparsegpt", pattern="2:4", targets=("re:0",), ignore=())
        from sparsetorch.oneshot.pipeline import _LayerPruner

        pruner = _LayerPruner(pruner_config, {"0": model[0]})
        context = calibration_precision(model, "bfloat16") if autocast else torch.autocast("cpu", enabled=False)
        with context:
            pruner.prune_group([model[0]], stat)
        results.append(model[0].weight.detach().clone())
    assert torch.equal(results[0], results[1])
