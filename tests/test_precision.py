"""Calibration precision: bf16 forwards where asked, fp32 statistics and solvers always."""

import pytest
import torch
from torch import nn

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.kernels.cpu_features import has_native_bf16
from sparsetorch.oneshot.precision import calibration_dtype, calibration_precision
from sparsetorch.oneshot.stats import Gram


def test_calibration_dtype_choices():
    fp32, bf16 = nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16)
    assert calibration_dtype(fp32, "model") == torch.float32
    assert calibration_dtype(fp32, "bfloat16") == torch.bfloat16
    assert calibration_dtype(fp32, "auto") == (torch.bfloat16 if has_native_bf16() else torch.float32)
    assert calibration_dtype(bf16, "auto") == calibration_dtype(bf16, "model") == torch.bfloat16
    with pytest.raises(ValueError, match=r"calib_dtype must be one of \['model', 'bfloat16', 'auto'\]"):
        sparsetorch.PruneConfig(calib_dtype="fp16")


def test_gram_under_autocast_stays_fp32_and_close():
    torch.manual_seed(0)
    batches = [torch.randn(256, 48) for _ in range(8)]
    exact, low = Gram(48), Gram(48)
    for x in batches:
        exact.add_batch(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low.add_batch(x)
    assert low.value.dtype == torch.float32
    scale = exact.value.diagonal().mean()
    error = (low.value - exact.value).abs().max() / scale
    assert 0 < error < 5e-3  # rounded (so bf16 really ran), by less than the 1% dampening
    torch.testing.assert_close(low.value, low.value.t(), rtol=0, atol=0)


def _linear_output_dtypes(calib_dtype):
    """The dtype each target Linear produced during calibration."""
    torch.manual_seed(0)
    model = tiny_llama()
    seen = {}

    def record(module, args, output):
        seen.setdefault(module, output.dtype)

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    report = sparsetorch.prune(model, calibration_ids(), method="sparsegpt", pattern="2:4", calib_dtype=calib_dtype,
                               progress=False)
    for handle in handles:
        handle.remove()
    return set(seen.values()), model, report


def test_bf16_calibration_runs_bf16_matmuls_and_keeps_fp32_weights():
    dtypes, model, report = _linear_output_dtypes("bfloat16")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(layer.sparsity == 0.5 for layer in report.layers.values())
    assert not torch.is_autocast_enabled("cpu")  # the context is left behind

    dtypes, _, fp32_report = _linear_output_dtypes("model")
    assert dtypes == {torch.float32}
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
            pruner.prune(model[0], stat)
        results.append(model[0].weight.detach().clone())
    assert torch.equal(results[0], results[1])
