"""Calibration linears through oneDNN with packed weights: same products as nn.Linear,
never a stale weight, and everything put back."""

import contextlib

import pytest
import torch
from torch import nn

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot import linears, pipeline
from sparsetorch.oneshot.linears import PackedWeights, onednn_linear_ops, packed_linears
from sparsetorch.targets import set_weight_matrix

needs_onednn = pytest.mark.skipif(onednn_linear_ops() is None, reason="this torch build has no oneDNN")


def _counting(monkeypatch) -> list:
    """Count the weights packed, through the real reorder."""
    packed = []
    reorder, matmul = onednn_linear_ops()
    monkeypatch.setattr(linears, "onednn_linear_ops", lambda: (lambda w, rows: packed.append(1) or reorder(w, rows),
                                                               matmul))
    return packed


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 48), (1, 48), (2, 5, 48)])
def test_packed_product_equals_nn_linear(shape, bias):
    layer = nn.Linear(48, 24, bias=bias)
    x = torch.randn(shape)
    if len(shape) == 3:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input too
    with torch.no_grad():
        expected = layer(x)
        with packed_linears(layer):
            got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(layer)


@needs_onednn
def test_a_weight_written_in_place_is_packed_again(monkeypatch):
    packed = _counting(monkeypatch)
    layer = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    with torch.no_grad(), packed_linears(layer):
        layer(x)
        layer(x)
        assert len(packed) == 1  # one pack serves every batch
        pruned = layer.weight * (torch.rand_like(layer.weight) > 0.5)
        set_weight_matrix(layer, pruned)
        got = layer(x)
        assert len(packed) == 2
    torch.testing.assert_close(got, x @ pruned.t(), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_grad_autocast_and_other_dtypes_take_the_layer_s_own_forward(monkeypatch):
    packed = _counting(monkeypatch)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with packed_linears(layer):
        assert layer(x).requires_grad  # autograd: nn.Linear itself
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer(x).dtype == torch.bfloat16
            assert layer.double()(x.double()).dtype == torch.float64
    assert packed == []


def test_only_the_last_used_weights_are_kept():
    reorder = lambda weight, rows: weight.clone()  # noqa: E731 - any reorder: the cache is under test
    cache = PackedWeights(reorder, keep=2)
    layers = [nn.Linear(4, 4) for _ in range(3)]
    for layer in layers:
        cache.get(layer, rows=1)
    assert len(cache) == 2
    first = cache.get(layers[1], rows=1)
    assert cache.get(layers[1], rows=1) is first  # still kept
    assert cache.get(layers[0], rows=1) is not None and len(cache) == 2


@needs_onednn
def test_pruning_packs_weights_and_keeps_the_masks(monkeypatch):
    packed = _counting(monkeypatch)
    model = tiny_llama(layers=2)
    plain = tiny_llama(layers=2)
    plain.load_state_dict(model.state_dict())
    ids = calibration_ids()
    report = sparsetorch.prune(model, ids, method="wanda", pattern="2:4", progress=False)
    assert packed  # the pipeline ran its linears through oneDNN
    assert not any("forward" in vars(m) for m in model.modules())
    monkeypatch.setattr(pipeline, "packed_linears", lambda model: contextlib.nullcontext())
    expected = sparsetorch.prune(plain, ids, method="wanda", pattern="2:4", progress=False)
    # the same masks up to float32 rounding: a near-tie may fall the other way on another CPU
    differing = sum(int((report.masks[name] != mask).sum()) for name, mask in expected.masks.items())
    assert differing <= 1e-3 * sum(mask.numel() for mask in expected.masks.values())
