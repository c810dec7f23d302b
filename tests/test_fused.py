"""The fused RMSNorm, rotary and SiLU-gating kernels against transformers' own code, and
where pruning uses them."""

import types

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot import fused
from sparsetorch.oneshot.fused import fused_elementwise, fused_ops
from test_pipeline import _family

needs_kernels = pytest.mark.skipif(fused_ops() is None, reason="no C++ kernels on this machine")


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 7, 64), (2, 5, 37), (1, 576)])
def test_rms_norm_matches_transformers(shape):
    norm = modeling_llama.LlamaRMSNorm(shape[-1], eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(shape) * 3
    with torch.no_grad():
        torch.testing.assert_close(fused_ops().rms_norm(x, norm.weight, 1e-5), norm(x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rotary_matches_transformers_and_keeps_its_layout(cos_batch):
    q = torch.randn(2, 7, 6, 16).transpose(1, 2)  # (batch, heads, tokens, dim) over (batch, tokens, heads, dim)
    k = torch.randn(2, 7, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(cos_batch, 7, 16), torch.randn(cos_batch, 7, 16)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = fused_ops().rotary(q, k, cos, sin)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert g.stride() == e.stride()


@needs_kernels
def test_silu_mul_matches_torch_over_the_whole_range():
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    u = torch.randn_like(g)
    torch.testing.assert_close(fused_ops().silu_mul(g, u), F.silu(g) * u, rtol=2e-6, atol=1e-30)


@needs_kernels
def test_kernels_refuse_bad_input():
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        fused_ops().rms_norm(torch.randn(4, 8).double(), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight has 7 values, x has 8 features"):
        fused_ops().rms_norm(torch.randn(4, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="g and u must have one shape"):
        fused_ops().silu_mul(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="does not match q or k"):
        fused_ops().rotary(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_fused_forward_equals_the_plain_one(family):
    torch.manual_seed(0)
    model = _family(family)
    ids = calibration_ids(windows=2)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with fused_elementwise(model):
            assert any("forward" in vars(m) for m in model.modules())
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not any("forward" in vars(m) for m in model.modules())  # every instance forward is gone again


@needs_kernels
def test_fused_ops_run_in_pruning_and_everything_is_put_back(monkeypatch):
    calls = []
    ops = fused_ops()
    monkeypatch.setattr(fused, "fused_ops", lambda: calls.append(1) or ops)
    rotary = modeling_llama.apply_rotary_pos_emb
    model = tiny_llama(layers=2)
    sparsetorch.prune(model, calibration_ids(), method="wanda", pattern="2:4", progress=False)
    assert calls
    assert modeling_llama.apply_rotary_pos_emb is rotary
    assert not any("forward" in vars(m) for m in model.modules())


@needs_kernels
def test_everything_is_put_back_after_an_error():
    model = tiny_llama(layers=1)
    rotary = modeling_llama.apply_rotary_pos_emb
    with pytest.raises(KeyError), fused_elementwise(model):
        raise KeyError("boom")
    assert modeling_llama.apply_rotary_pos_emb is rotary
    assert not any("forward" in vars(m) for m in model.modules())


@needs_kernels
def test_a_forward_set_on_the_instance_before_survives():
    model = tiny_llama(layers=1)
    norm = model.model.norm
    own = norm.forward  # a bound method, as accelerate's hooks set it
    norm.forward = own
    with fused_elementwise(model):
        assert norm.forward is not own
    assert norm.forward is own


@needs_kernels
def test_bf16_and_other_families_take_the_plain_code(monkeypatch):
    def ran(*args):
        pytest.fail("a fused kernel ran")

    refusing = types.SimpleNamespace(rms_norm=ran, silu_mul=ran, rotary=ran)
    monkeypatch.setattr(fused, "fused_ops", lambda: refusing)
    gpt2 = _family("gpt2")
    with torch.no_grad(), fused_elementwise(gpt2):
        gpt2(input_ids=calibration_ids(windows=1))
    model = tiny_llama(layers=1).to(torch.bfloat16)
    with torch.no_grad():
        expected = model(input_ids=calibration_ids(windows=1)).logits
        with fused_elementwise(model):
            got = model(input_ids=calibration_ids(windows=1)).logits
    assert torch.equal(got, expected)
