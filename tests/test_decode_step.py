"""The decode step of the own model: stacked projections (`cat_rows`, `runtime.fuse_projections`), the
C++ ops it runs between the matmuls (residual add + norm, gating of a stacked gate/up, attention after
a cache), and that the step computes what the general path and the unfused model compute."""

import pytest
import torch
import torch.nn.functional as F

from conftest import structure_weight
from sparsetorch.formats.quantized import QuantizedTensor
from sparsetorch.formats.registry import get_format
from sparsetorch.kernels.cpu_features import supported_isas
from sparsetorch.models import ops
from sparsetorch.models.llama import LeanConfig, LeanLlama
from sparsetorch.models.ops import decode_ops, fused_add_rms_norm, rms_norm, silu_mul_halves
from sparsetorch.nn import SparseLinear
from sparsetorch.quantize import find_grid, parse_scheme
from sparsetorch.runtime import fuse_projections

needs_step = pytest.mark.skipif(decode_ops() is None, reason="no C++ decode ops on this machine")
STRUCTURES = ("bitmask", "csr16", "nm", "dense")


def _weights(structure, rows=(8, 4, 4), cols=64):
    return [structure_weight(structure, r, cols) for r in rows]


# ---------------------------------------------------------------- cat_rows


@pytest.mark.parametrize("structure", STRUCTURES)
def test_cat_rows_stacks_the_rows_of_every_fp32_format(structure):
    dense = _weights(structure)
    layout = (2, 4) if structure == "nm" else ()
    parts = [get_format(structure).from_dense(w, *layout) for w in dense]
    joined = type(parts[0]).cat_rows(parts)
    assert type(joined) is type(parts[0]) and joined.shape == (16, 64)
    assert torch.equal(joined.to_dense(), torch.cat(dense))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g32-asym", "int8-asym"])
def test_cat_rows_keeps_every_code_and_scale_of_quantized_weights(structure, scheme):
    layout = (2, 4) if structure == "nm" else ()
    quantized = []
    for w in _weights(structure, rows=(5, 3, 3)):  # odd counts: 4-bit codes of one row straddle a byte
        grid = find_grid(w, parse_scheme(scheme), w != 0)
        quantized.append(QuantizedTensor.from_dense(w, grid, structure, *layout))
    joined = QuantizedTensor.cat_rows(quantized)
    assert joined.kernel_format == quantized[0].kernel_format and joined.scheme == quantized[0].scheme
    assert torch.equal(joined.to_dense(), torch.cat([q.to_dense() for q in quantized]))
    reread = QuantizedTensor.from_parts(joined.parts(), scheme=joined.scheme, structure=structure)  # checks the parts
    assert torch.equal(reread.to_dense(), joined.to_dense())


def test_cat_rows_refuses_weights_that_do_not_agree():
    bitmask = get_format("bitmask")
    with pytest.raises(ValueError, match="formats, layouts, widths"):
        bitmask.cat_rows([bitmask.from_dense(torch.randn(4, 8)), bitmask.from_dense(torch.randn(4, 16))])
    with pytest.raises(ValueError, match="formats, layouts, widths"):
        bitmask.cat_rows([bitmask.from_dense(torch.randn(4, 8)), get_format("csr16").from_dense(torch.randn(4, 8))])
    w = torch.randn(4, 64)
    int8, int4 = (QuantizedTensor.from_dense(w, find_grid(w, parse_scheme(s)), "bitmask") for s in ("int8", "int4-g32"))
    with pytest.raises(ValueError):
        QuantizedTensor.cat_rows([int8, int4])
    with pytest.raises(ValueError, match="at least one"):
        bitmask.cat_rows([])


# ---------------------------------------------------------------- the ops


def test_add_rms_norm_adds_in_place_and_normalizes():
    x, update, weight = torch.randn(2, 3, 40), torch.randn(2, 3, 40), torch.randn(40)
    expected_x = x + update
    expected = rms_norm(expected_x.clone(), weight, 1e-6)
    got = fused_add_rms_norm(x, update, weight, 1e-6)
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_silu_mul_halves_gates_the_first_half_by_the_second():
    gate_up = torch.randn(3, 5, 2 * 48) * 4
    expected = F.silu(gate_up[..., :48]) * gate_up[..., 48:]
    torch.testing.assert_close(silu_mul_halves(gate_up), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(silu_mul_halves(gate_up.double()), expected.double(), rtol=1e-5, atol=1e-6)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _reference_step(qkv, cos, sin, keys, values, heads, past, scale):
    """What attention_after_cache computes, in plain PyTorch: (out, keys, values) with the new positions."""
    batch, tokens, _ = qkv.shape
    kv, dim = keys.shape[1], keys.shape[3]
    q, k, v = qkv.view(batch, tokens, heads + 2 * kv, dim).transpose(1, 2).split((heads, kv, kv), dim=1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    keys, values = keys.clone(), values.clone()
    keys[:, :, past : past + tokens] = _rotate(k, c, s)
    values[:, :, past : past + tokens] = v
    visible = torch.arange(past + tokens)[None, :] <= torch.arange(tokens)[:, None] + past
    out = F.scaled_dot_product_attention(_rotate(q, c, s), keys[:, :, : past + tokens], values[:, :, : past + tokens],
                                         attn_mask=visible, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, tokens, heads * dim), keys, values


@needs_step
@pytest.mark.parametrize(("batch", "tokens", "past", "heads", "kv"), [
    (1, 1, 0, 4, 2), (1, 1, 37, 9, 3), (2, 3, 5, 4, 4), (2, 16, 0, 8, 2), (1, 1, 250, 2, 1)])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_attention_after_cache_equals_rotary_cache_writes_and_sdpa(batch, tokens, past, heads, kv, cos_batch):
    dim, capacity = 16, 260
    qkv = torch.randn(batch, tokens, (heads + 2 * kv) * dim)
    cos, sin = torch.randn(min(cos_batch, batch), tokens, dim), torch.randn(min(cos_batch, batch), tokens, dim)
    keys, values = torch.randn(batch, kv, capacity, dim), torch.randn(batch, kv, capacity, dim)
    expected, expected_keys, expected_values = _reference_step(qkv, cos, sin, keys, values, heads, past, 0.3)
    out = decode_ops().attention_after_cache(qkv, cos, sin, keys, values, heads, past, 0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(values, expected_values)


@needs_step
def test_attention_after_cache_refuses_bad_input():
    step = decode_ops().attention_after_cache
    qkv, cos = torch.randn(1, 2, 8 * 16), torch.randn(1, 2, 16)
    keys = torch.zeros(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="do not fit the cache's capacity 4"):
        step(qkv, cos, cos, keys, keys.clone(), 4, 3, 1.0)
    with pytest.raises(RuntimeError, match="does not hold 5 query heads"):
        step(qkv, cos, cos, keys, keys.clone(), 5, 0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous 4-D float32"):
        step(qkv, cos, cos, keys.transpose(1, 2), keys.clone(), 4, 0, 1.0)
    with pytest.raises(RuntimeError, match="cos and sin"):
        step(qkv, cos[:, :1], cos[:, :1], keys, keys.clone(), 4, 0, 1.0)


# ---------------------------------------------------------------- in the model


def _model(qkv_bias=False):
    config = LeanConfig(model_type="qwen2" if qkv_bias else "llama", vocab_size=96, hidden_size=64,
                        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=qkv_bias)
    model = LeanLlama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _decode(model, prompt, steps=6):
    """Logits of the prompt and of `steps` greedy tokens after it, (steps + 1, vocab)."""
    cache = model.new_cache(batch=prompt.shape[0], capacity=4)  # grows twice on the way
    logits = [model(prompt, cache)]
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1, keepdim=True), cache))
    return torch.cat(logits)


def _sparse(model, kind):
    """Every block's linears as SparseLinear: 'bitmask' fp32, 'int8' (bitmask codes), 'int4' (2:4 codes)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = structure_weight("nm" if kind == "int4" else "bitmask", *module.weight.shape)
        if kind == "bitmask":
            weight = get_format("bitmask").from_dense(w)
        else:
            grid = find_grid(w, parse_scheme("int8" if kind == "int8" else "int4-g64"), w != 0)
            weight = QuantizedTensor.from_dense(w, grid, "nm" if kind == "int4" else "bitmask", *(
                (2, 4) if kind == "int4" else ()))
        bias = None if module.bias is None else module.bias.detach().clone()
        model.set_submodule(name, SparseLinear(weight, bias, "avx512" if kind != "bitmask" else "auto"))
    return model


def _copy(model):
    clone = LeanLlama(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_projections_give_the_unfused_logits_in_prefill_and_decode(qkv_bias):
    model = _model(qkv_bias)
    prompt = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    expected, fused = _decode(model, prompt), _copy(model)
    names = fuse_projections(fused)
    assert names == [f"model.layers.{i}.{child}" for i in range(2) for child in ("self_attn.qkv_proj", "mlp.gate_up_proj")]
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj") and fuse_projections(fused) == []
    torch.testing.assert_close(_decode(fused, prompt), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused(prompt), model(prompt), rtol=1e-4, atol=1e-4)  # no cache: the general path


@pytest.mark.parametrize("kind", ["bitmask", "int8", "int4"])
def test_stacked_sparse_layers_give_the_unstacked_logits(kind):
    if kind != "bitmask" and "avx512" not in supported_isas():
        pytest.skip("the quantized fp32-activation kernels need AVX-512 here")
    torch.manual_seed(4)
    model = _sparse(_model(), kind)
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(5))
    expected = _decode(model, prompt)
    assert len(fuse_projections(model)) == 4
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, SparseLinear)
    torch.testing.assert_close(_decode(model, prompt), expected, rtol=1e-4, atol=1e-4)


def test_layers_that_do_not_agree_stay_separate_and_still_run():
    model = _model()
    expected = _decode(model, torch.tensor([[1, 2, 3]]))
    attn = model.model.layers[0].self_attn
    attn.k_proj = SparseLinear.from_linear(attn.k_proj, "bitmask")  # one sparse among dense ones
    assert fuse_projections(model) == ["model.layers.0.mlp.gate_up_proj", "model.layers.1.self_attn.qkv_proj",
                                       "model.layers.1.mlp.gate_up_proj"]
    assert attn.qkv_proj is None and isinstance(attn.k_proj, SparseLinear)
    torch.testing.assert_close(_decode(model, torch.tensor([[1, 2, 3]])), expected, rtol=1e-4, atol=1e-4)


@needs_step
def test_the_decode_step_takes_the_ops_and_equals_the_general_path(monkeypatch):
    model = _model()
    fuse_projections(model)
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(6))  # prefill > STEP_TOKENS
    real, runs = decode_ops(), []

    class Counting:
        def __getattr__(self, name):
            runs.append(name)
            return getattr(real, name)

    monkeypatch.setattr(ops, "decode_ops", lambda: Counting())
    fast = _decode(model, prompt, steps=4)
    assert runs.count("attention_after_cache") == 4 * 2 and runs.count("rms_norm") == 4  # 4 steps, 2 layers; not the prefill
    monkeypatch.setattr(ops, "decode_ops", lambda: None)
    torch.testing.assert_close(fast, _decode(model, prompt, steps=4), rtol=1e-4, atol=1e-4)


@needs_step
def test_attention_after_cache_takes_rows_of_the_batch_too():
    qkv, cos = torch.randn(2, 3, 8 * 16), torch.randn(1, 3, 16)
    keys, values = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    step = decode_ops().attention_after_cache
    expected = step(qkv, cos, cos, keys.clone(), values.clone(), 4, 2, 0.25)
    rows = step(qkv.view(6, -1), cos, cos, keys, values, 4, 2, 0.25)
    assert rows.shape == (6, 4 * 16)
    torch.testing.assert_close(rows, expected.view(6, -1), rtol=0, atol=0)


@needs_step
def test_hooks_run_in_the_step_and_a_new_cache_sees_replaced_modules():
    model = _model()
    fuse_projections(model)
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    prompt = torch.tensor([[1, 2, 3]])
    _decode(model, prompt, steps=3)
    assert seen == [(3, 64)] + [(1, 64)] * 3  # called as a module, on the rows of the prompt, then of each step
    expected = _decode(model, prompt)
    cache = model.new_cache()
    model(prompt, cache)  # this cache's plan is made at its first step
    attn = model.model.layers[0].self_attn
    attn.o_proj = SparseLinear.from_linear(attn.o_proj, "bitmask")  # all weights kept: the same layer
    assert cache.plan and attn.o_proj is not cache.plan.blocks[0].o
    torch.testing.assert_close(_decode(model, prompt), expected, rtol=1e-4, atol=1e-4)
