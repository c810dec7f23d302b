"""The own model's linears through oneDNN on packed weights (`sparsetorch.models.packed`): same
products as nn.Linear, never a stale weight, a bounded cache, and the same pruning masks."""

import pytest
import torch
from torch import nn

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.models import packed as packed_module
from sparsetorch.models.packed import KEEP, PackedLinear, PackedWeights, onednn_linear_ops
from sparsetorch.oneshot import capture
from sparsetorch.targets import set_weight_matrix

needs_onednn = pytest.mark.skipif(onednn_linear_ops() is None, reason="this torch build has no oneDNN")


def _counting(monkeypatch) -> list:
    """The weights packed (one entry each), through the real reorder."""
    packed = []
    reorder, matmul = onednn_linear_ops()
    monkeypatch.setattr(packed_module, "onednn_linear_ops",
                        lambda: (lambda w, rows: packed.append(w) or reorder(w, rows), matmul))
    return packed


def _packed_copy(layer: nn.Linear, cache: PackedWeights | None) -> PackedLinear:
    copy = PackedLinear(layer.in_features, layer.out_features, layer.bias is not None, packed=cache)
    copy.load_state_dict(layer.state_dict())
    return copy


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 48), (1, 48), (2, 5, 48)])
def test_packed_product_equals_nn_linear(shape, bias, monkeypatch):
    packed = _counting(monkeypatch)
    layer = nn.Linear(48, 24, bias=bias)
    fast = _packed_copy(layer, PackedWeights())
    x = torch.randn(shape)
    if len(shape) == 3:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous input too
    with torch.no_grad():
        expected = layer(x)
        got = fast(x)
    assert len(packed) == 1  # it did multiply through oneDNN
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_weight_written_in_place_is_packed_again(monkeypatch):
    packed = _counting(monkeypatch)
    layer = PackedLinear(32, 16, bias=False, packed=PackedWeights())
    x = torch.randn(8, 32)
    with torch.no_grad():
        layer(x)
        layer(x)
        assert len(packed) == 1  # one pack serves every batch
        pruned = layer.weight * (torch.rand_like(layer.weight) > 0.5)
        set_weight_matrix(layer, pruned)  # in place: the version counter moves, the storage stays
        got = layer(x)
        assert len(packed) == 2
        torch.testing.assert_close(got, x @ pruned.t(), rtol=1e-5, atol=1e-5)
        replaced = torch.randn(16, 32)
        layer.weight = nn.Parameter(replaced)  # a new tensor altogether
        torch.testing.assert_close(layer(x), x @ replaced.t(), rtol=1e-5, atol=1e-5)
        assert len(packed) == 3


@needs_onednn
def test_grad_autocast_other_dtypes_and_no_cache_take_nn_linear(monkeypatch):
    packed = _counting(monkeypatch)
    layer = PackedLinear(16, 8, packed=PackedWeights())
    x = torch.randn(4, 16, requires_grad=True)
    out = layer(x)  # autograd: nn.Linear itself
    assert out.requires_grad
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert layer(x[0]).shape == (8,)  # a single vector
        assert layer.double()(x.double()).dtype == torch.float64
        assert layer.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16
        unpacked = PackedLinear(16, 8)  # no cache: an inference model's linear
        torch.testing.assert_close(unpacked(x), nn.functional.linear(x, unpacked.weight, unpacked.bias))
    assert packed == []


def test_only_the_last_used_weights_are_kept(monkeypatch):
    packs = []
    # any reorder: the cache is under test
    monkeypatch.setattr(packed_module, "onednn_linear_ops", lambda: (lambda w, rows: packs.append(w) or w.clone(), None))
    cache = PackedWeights(keep=2)
    layers = [nn.Linear(4, 4) for _ in range(3)]
    for layer in layers:
        cache.get(layer, rows=1)
    assert len(cache) == 2 and len(packs) == 3
    first = cache.get(layers[1], rows=1)
    assert cache.get(layers[1], rows=1) is first and len(packs) == 3  # still kept, now the most recent
    cache.get(layers[0], rows=1)  # packed again; drops layers[2], the least recently used
    assert len(cache) == 2 and len(packs) == 4
    assert cache.get(layers[1], rows=1) is first and len(packs) == 4
    cache.get(layers[2], rows=1)
    assert len(packs) == 5
    assert PackedWeights().keep == KEEP >= 7  # a Llama block's seven linears fit


@needs_onednn
def test_the_own_model_packs_only_for_calibration(monkeypatch):
    packed = _counting(monkeypatch)
    from sparsetorch.models.llama import LeanLlama

    hf = tiny_llama(layers=1)
    ids = calibration_ids(windows=2)
    plain = LeanLlama.sharing(hf)(ids)
    assert packed == []
    cache = PackedWeights()
    ours = LeanLlama.sharing(hf, cache)
    torch.testing.assert_close(ours(ids), plain, rtol=1e-5, atol=1e-5)
    assert len(packed) == len(cache) == 7  # the block's linears; lm_head is nn.Linear's
    ours(ids)
    assert len(packed) == 7


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
    count = len(packed)
    monkeypatch.setattr(capture, "PackedWeights", lambda: None)  # the own model with nn.Linear's products
    expected = sparsetorch.prune(plain, ids, method="wanda", pattern="2:4", progress=False)
    assert len(packed) == count
    assert report.masks.keys() == expected.masks.keys() and len(report.masks) == 14
    # the same masks up to float32 rounding: a near-tie may fall the other way on another CPU
    differing = sum(int((report.masks[name] != mask).sum()) for name, mask in expected.masks.items())
    assert differing <= 1e-3 * sum(mask.numel() for mask in expected.masks.values())
