"""The calibration forwards' causal attention kernel against PyTorch's SDPA, and where it is used."""

import pytest
import torch
import torch.nn.functional as F

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot import attention
from sparsetorch.oneshot.attention import calibration_attention, causal_attention_op, kernel_causal_attention
from test_pipeline import FAMILIES, _family

needs_kernel = pytest.mark.skipif(causal_attention_op() is None, reason="no C++ kernels on this machine")


@pytest.fixture
def kernel_runs(monkeypatch):
    """A list that gets an entry for every call of the kernel (which still runs)."""
    runs, op = [], causal_attention_op()
    monkeypatch.setattr(attention, "causal_attention_op", lambda: lambda *args: runs.append(1) or op(*args))
    return runs


def _qkv(batch, heads, kv_heads, tokens, dim, dtype=torch.float32):
    """Laid out as transformers makes them: (batch, tokens, heads, dim) memory seen as (batch, heads, tokens, dim)."""
    q = torch.randn(batch, tokens, heads, dim, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, tokens, kv_heads, dim, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, tokens, kv_heads, dim, dtype=dtype).transpose(1, 2)
    return q, k, v


def _sdpa(q, k, v, scale=None):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 17, 64, 65, 200])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 16), (6, 2, 64), (9, 3, 64), (4, 1, 32)])
def test_kernel_equals_sdpa_to_float_rounding(tokens, heads, kv_heads, dim):
    q, k, v = _qkv(2, heads, kv_heads, tokens, dim)
    out = causal_attention_op()(q, k, v, dim**-0.5)
    assert out.shape == (2, tokens, heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(q, k, v), rtol=0, atol=2e-6)


@needs_kernel
def test_kernel_takes_any_strides_and_scale_and_thread_count():
    q, k, v = (t.contiguous() for t in _qkv(3, 6, 3, 70, 32))  # (batch, heads, tokens, dim) contiguous
    expected = _sdpa(q, k, v, scale=0.3)
    threads = torch.get_num_threads()
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            torch.testing.assert_close(causal_attention_op()(q, k, v, 0.3), expected, rtol=0, atol=2e-6)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_kernel_refuses_bad_input():
    q, k, v = _qkv(1, 4, 2, 8, 16)
    with pytest.raises(RuntimeError, match="float32"):
        causal_attention_op()(q.double(), k, v, 0.25)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        causal_attention_op()(q, k[:, :, :4], v[:, :, :4], 0.25)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        causal_attention_op()(q[:, :3], k, v, 0.25)  # 3 query heads cannot share 2 key/value heads


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2
    training = False


@pytest.mark.parametrize("case", ["mask", "bf16", "autocast", "cache", "sliding window"])
def test_anything_but_plain_fp32_causal_attention_goes_to_sdpa(case, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(attention, "causal_attention_op", lambda: pytest.fail("the kernel ran"))
    q, k, v = (t.contiguous() for t in _qkv(1, 4, 2, 8, 16, torch.bfloat16 if case == "bf16" else torch.float32))
    mask = torch.ones(8, 8, dtype=torch.bool).tril() if case == "mask" else None
    if case == "cache":
        q = q[:, :, -1:]
    window = {"sliding_window": 4} if case == "sliding window" else {}  # narrower than the 8 tokens
    module = _Attention()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out, _ = kernel_causal_attention(module, q, k, v, mask, **window)
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, **window)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_inside_the_context_computes_what_it_does_outside(family, kernel_runs):
    model = _family(family)
    ids = calibration_ids(windows=3, tokens=40)
    with torch.no_grad():
        expected = model(ids).logits
        with calibration_attention(model):
            assert model.config._attn_implementation == attention.NAME
            logits = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
    assert kernel_runs, "the kernel never ran"
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_the_context_puts_the_implementation_back_on_error():
    model = tiny_llama()
    with pytest.raises(KeyError), calibration_attention(model):
        raise KeyError("stop")
    assert model.config._attn_implementation == "sdpa"


def test_models_of_other_attention_implementations_are_left_alone():
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    with calibration_attention(model):
        assert model.config._attn_implementation == "eager"


@needs_kernel
@pytest.mark.parametrize("layer_inputs", ["dense", "mixed", "pruned"])
def test_pruning_runs_its_calibration_attention_through_the_kernel(layer_inputs, kernel_runs):
    model = tiny_llama(layers=2)
    sparsetorch.prune(model, calibration_ids(windows=8), method="wanda", pattern="2:4", layer_inputs=layer_inputs,
                      batch_size=4, progress=False)
    # 2 batches per forward; 'dense' skips the pass of the last pruned block (it feeds nothing), 'mixed' needs it
    # to calibrate the down projections, 'pruned' makes only that pass
    assert len(kernel_runs) == {"dense": 2 * (2 + 1), "mixed": 2 * (2 + 2), "pruned": 2 * (1 + 1)}[layer_inputs]
    assert model.config._attn_implementation == "sdpa"
