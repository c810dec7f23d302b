"""The own model path's ops (`sparsetorch.models.ops`): the C++ kernels against PyTorch's SDPA and
transformers' own RMSNorm and rotary code, the PyTorch fallback against the kernels, when each is
taken, and that pruning runs them without touching transformers."""

import types

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.models import ops
from sparsetorch.models.llama import LeanLlama
from sparsetorch.models.ops import attention_op, causal_attention, compiled_ops, rms_norm, rotary, silu_mul
from test_pipeline import _family

needs_kernels = pytest.mark.skipif(compiled_ops() is None, reason="no C++ kernels on this machine")
needs_attention = pytest.mark.skipif(attention_op() is None, reason="no C++ attention on this machine")
OP_NAMES = ("causal_attention", "rms_norm", "silu_mul", "rotary", "add_rms_norm", "silu_mul_halves",
            "attention_after_cache")


@pytest.fixture
def kernel_runs(monkeypatch):
    """Calls of each C++ op by name (the ops still run)."""
    runs = dict.fromkeys(OP_NAMES, 0)
    real_ops, real_attention = compiled_ops(), attention_op()

    def counting(name, op):
        def run(*args):
            runs[name] += 1
            return op(*args)

        return run

    wrapped = types.SimpleNamespace(**{name: counting(name, getattr(real_ops, name)) for name in OP_NAMES[1:]})
    attention = counting("causal_attention", real_attention)
    monkeypatch.setattr(ops, "compiled_ops", lambda: wrapped)
    monkeypatch.setattr(ops, "attention_op", lambda: attention)
    return runs


@pytest.fixture
def no_kernels(monkeypatch):
    """Every op refuses to run: what the functions compute is their PyTorch fallback."""

    def ran(*args):
        pytest.fail("a C++ op ran")

    monkeypatch.setattr(ops, "compiled_ops", lambda: types.SimpleNamespace(**dict.fromkeys(OP_NAMES, ran)))
    monkeypatch.setattr(ops, "attention_op", lambda: ran)


def _fallback(monkeypatch):
    """From here on the functions find no C++ ops (as without a compiler)."""
    monkeypatch.setattr(ops, "compiled_ops", lambda: None)
    monkeypatch.setattr(ops, "attention_op", lambda: None)


# ---------------------------------------------------------------- causal attention


def _qkv(batch, heads, kv_heads, tokens, dim, dtype=torch.float32):
    """Laid out as the model makes them: (batch, tokens, heads, dim) memory seen as (batch, heads, tokens, dim)."""
    q = torch.randn(batch, tokens, heads, dim, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, tokens, kv_heads, dim, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, tokens, kv_heads, dim, dtype=dtype).transpose(1, 2)
    return q, k, v


def _sdpa(q, k, v, scale=None):
    """The reference: every query head with its key/value head repeated, (batch, tokens, heads, dim)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


@needs_attention
@pytest.mark.parametrize("tokens", [1, 17, 64, 65, 200])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 16), (6, 2, 64), (9, 3, 64), (4, 1, 32)])
def test_kernel_equals_sdpa_to_float_rounding(tokens, heads, kv_heads, dim):
    q, k, v = _qkv(2, heads, kv_heads, tokens, dim)
    out = attention_op()(q, k, v, dim**-0.5)
    assert out.shape == (2, tokens, heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(q, k, v), rtol=0, atol=2e-6)


@needs_attention
def test_kernel_takes_any_strides_and_scale_and_thread_count():
    q, k, v = (t.contiguous() for t in _qkv(3, 6, 3, 70, 32))  # (batch, heads, tokens, dim) contiguous
    expected = _sdpa(q, k, v, scale=0.3)
    threads = torch.get_num_threads()
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            torch.testing.assert_close(attention_op()(q, k, v, 0.3), expected, rtol=0, atol=2e-6)
    finally:
        torch.set_num_threads(threads)


@needs_attention
def test_kernel_refuses_bad_input():
    q, k, v = _qkv(1, 4, 2, 8, 16)
    with pytest.raises(RuntimeError, match="float32"):
        attention_op()(q.double(), k, v, 0.25)
    with pytest.raises(RuntimeError, match="unit stride over the last dim"):
        attention_op()(q.transpose(2, 3), k, v, 0.25)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        attention_op()(q, k[:, :, :4], v[:, :, :4], 0.25)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        attention_op()(q[:, :3], k, v, 0.25)  # 3 query heads cannot share 2 key/value heads


@needs_attention
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (4, 1)])
def test_causal_attention_takes_the_kernel_and_equals_its_fallback(heads, kv_heads, kernel_runs, monkeypatch):
    q, k, v = _qkv(2, heads, kv_heads, 37, 16)  # q, k and v non-contiguous, as a transpose leaves them
    assert not q.is_contiguous()
    fast = causal_attention(q, k, v, 0.25)
    assert kernel_runs["causal_attention"] == 1
    _fallback(monkeypatch)
    plain = causal_attention(q, k, v, 0.25)
    assert fast.shape == plain.shape == (2, 37, heads, 16)
    torch.testing.assert_close(fast, plain, rtol=0, atol=2e-6)
    torch.testing.assert_close(plain, _sdpa(q, k, v, scale=0.25), rtol=0, atol=2e-6)


@pytest.mark.parametrize("case", ["bf16", "float64", "autocast", "strided last dim"])
def test_anything_but_plain_fp32_attention_takes_sdpa(case, no_kernels):
    dtype = {"bf16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    q, k, v = _qkv(1, 4, 2, 24, 16, dtype)
    if case == "strided last dim":
        q, k, v = (t[..., ::2] for t in _qkv(1, 4, 2, 24, 32))
    expected = _sdpa(q.double(), k.double(), v.double(), scale=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = causal_attention(q, k, v, 0.3)
    assert out.dtype == (torch.bfloat16 if case in ("bf16", "autocast") else dtype)
    tolerance = 2e-2 if out.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------- RMSNorm, rotary, SiLU gating


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 7, 64), (2, 5, 37), (1, 576)])
def test_rms_norm_matches_transformers(shape):
    norm = modeling_llama.LlamaRMSNorm(shape[-1], eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(shape) * 3
    with torch.no_grad():
        expected = norm(x)
        torch.testing.assert_close(compiled_ops().rms_norm(x, norm.weight, 1e-5), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rotary_matches_transformers_and_keeps_its_layout(cos_batch):
    q = torch.randn(2, 7, 6, 16).transpose(1, 2)  # (batch, heads, tokens, dim) over (batch, tokens, heads, dim)
    k = torch.randn(2, 7, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(cos_batch, 7, 16), torch.randn(cos_batch, 7, 16)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for got in (compiled_ops().rotary(q, k, cos, sin), rotary(q, k, cos, sin)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
            assert g.stride() == e.stride()


@needs_kernels
def test_silu_mul_matches_torch_over_the_whole_range():
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    u = torch.randn_like(g)
    torch.testing.assert_close(compiled_ops().silu_mul(g, u), F.silu(g) * u, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(silu_mul(g, u), F.silu(g) * u, rtol=2e-6, atol=1e-30)


@needs_kernels
def test_kernels_refuse_bad_input():
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        compiled_ops().rms_norm(torch.randn(4, 8).double(), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight has 7 values, x has 8 features"):
        compiled_ops().rms_norm(torch.randn(4, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="g and u must have one shape"):
        compiled_ops().silu_mul(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="does not match q or k"):
        compiled_ops().rotary(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))


@needs_kernels
def test_each_function_takes_its_kernel_and_equals_its_fallback(kernel_runs, monkeypatch):
    x, weight = torch.randn(3, 9, 40) * 3, torch.randn(40)
    gate, up = torch.randn(3, 9, 96) * 4, torch.randn(3, 9, 96)
    q, k, _ = _qkv(3, 6, 2, 9, 16)
    cos, sin = torch.randn(1, 9, 16), torch.randn(1, 9, 16)
    fast = [rms_norm(x, weight, 1e-6), silu_mul(gate, up), *rotary(q, k, cos, sin)]
    assert kernel_runs == {**dict.fromkeys(OP_NAMES, 0), "rms_norm": 1, "silu_mul": 1, "rotary": 1}
    _fallback(monkeypatch)
    plain = [rms_norm(x, weight, 1e-6), silu_mul(gate, up), *rotary(q, k, cos, sin)]
    for f, p in zip(fast, plain):
        assert f.shape == p.shape and f.dtype == p.dtype == torch.float32
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["bf16", "float64", "autocast", "non-contiguous"])
def test_anything_but_contiguous_fp32_takes_the_pytorch_code(case, no_kernels):
    dtype = {"bf16": torch.bfloat16, "float64": torch.float64}.get(case, torch.float32)
    x, weight = torch.randn(2, 5, 32, dtype=dtype), torch.randn(32, dtype=dtype)
    gate, up = torch.randn(2, 5, 48, dtype=dtype), torch.randn(2, 5, 48, dtype=dtype)
    q, k, _ = _qkv(2, 4, 2, 5, 16, dtype)
    cos, sin = torch.randn(1, 5, 16, dtype=dtype), torch.randn(1, 5, 16, dtype=dtype)
    if case == "non-contiguous":  # the rotary needs unit stride over the last dim only
        x, gate, up = x.transpose(0, 1), gate.transpose(0, 1), up.transpose(0, 1)
        q, k = q[..., ::2], k[..., ::2]
        cos, sin = cos[..., ::2], sin[..., ::2]
    norm = modeling_llama.LlamaRMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = [rms_norm(x, weight, 1e-6), silu_mul(gate, up), *rotary(q, k, cos, sin)]
        expected = [norm(x), F.silu(gate) * up, *modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)]
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# ---------------------------------------------------------------- in the model and in pruning


@needs_attention
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_own_model_runs_every_kernel_and_equals_its_fallback_forward(family, kernel_runs, monkeypatch):
    ours = LeanLlama.sharing(_family(family))
    ids = calibration_ids(windows=3, tokens=40)
    fast = ours(ids)
    layers = len(ours.model.layers)
    # per block: two norms, one rotary, one attention, one gating (the final norm, of the last position
    # alone, reads a strided slice of a batch and may take the PyTorch code)
    assert kernel_runs["causal_attention"] == kernel_runs["silu_mul"] == kernel_runs["rotary"] == layers
    assert kernel_runs["add_rms_norm"] == 2 * layers and kernel_runs["rms_norm"] == 1  # each add fused with a norm
    _fallback(monkeypatch)
    torch.testing.assert_close(fast, ours(ids), rtol=0, atol=1e-5)


def _transformers_state(model):
    """What patching transformers or the model would change: the modeling module's globals, its
    classes' forwards, the attention functions and the model's attention implementation."""
    from transformers import AttentionInterface

    classes = [value for value in vars(modeling_llama).values() if isinstance(value, type)]
    return {
        "globals": dict(vars(modeling_llama)),
        "forwards": {cls: vars(cls).get("forward") for cls in classes},
        "attention": dict(AttentionInterface._global_mapping),
        "implementation": model.config._attn_implementation,
        "types": [type(m) for m in model.modules()],
    }


def _assert_untouched(model, before):
    from transformers import AttentionInterface

    now = _transformers_state(model)
    assert now["globals"].keys() == before["globals"].keys()
    assert all(now["globals"][name] is value for name, value in before["globals"].items())
    assert modeling_llama.apply_rotary_pos_emb is before["globals"]["apply_rotary_pos_emb"]
    assert all(now["forwards"][cls] is forward for cls, forward in before["forwards"].items())
    assert now["attention"] == before["attention"]
    assert not any("sparsetorch" in name for name in AttentionInterface._global_mapping)
    assert now["implementation"] == before["implementation"] == "sdpa"
    assert now["types"] == before["types"]
    assert not any("forward" in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@needs_attention
@pytest.mark.parametrize("layer_inputs", ["dense", "mixed", "pruned"])
def test_pruning_calibrates_through_the_kernels_and_leaves_transformers_untouched(layer_inputs, kernel_runs,
                                                                                    monkeypatch):
    model = tiny_llama(layers=2)
    before = _transformers_state(model)
    attention_runs = []
    attention = ops.attention_op()

    def checking(*args):  # the state as the calibration forwards see it, not only once they are done
        if not attention_runs:
            _assert_untouched(model, before)
        attention_runs.append(1)
        return attention(*args)

    monkeypatch.setattr(ops, "attention_op", lambda: checking)
    report = sparsetorch.prune(model, calibration_ids(windows=8), method="wanda", pattern="2:4",
                               layer_inputs=layer_inputs, batch_size=4, progress=False)
    # 2 batches per forward; 'dense' skips the pass of the last pruned block (it feeds nothing), 'mixed' needs it
    # to calibrate the down projections, 'pruned' makes only that pass
    assert len(attention_runs) == {"dense": 2 * (2 + 1), "mixed": 2 * (2 + 2), "pruned": 2 * (1 + 1)}[layer_inputs]
    assert kernel_runs["rms_norm"] and kernel_runs["silu_mul"] and kernel_runs["rotary"]
    _assert_untouched(model, before)
    assert len(report.masks) == 14
    for name, mask in report.masks.items():  # pruning our model pruned transformers' one
        weight = model.get_submodule(name).weight
        assert torch.equal(weight != 0, mask.to(torch.bool)) and weight.numel() == 2 * int((weight != 0).sum())


def test_bf16_models_and_other_families_prune_through_the_pytorch_code(no_kernels):
    report = sparsetorch.prune(_family("gpt2"), calibration_ids(), method="wanda", pattern="2:4", progress=False)
    assert len(report.masks) == 8
    model = tiny_llama(layers=1).to(torch.bfloat16)
    ids = calibration_ids(windows=2)
    ours = LeanLlama.sharing(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(ours(ids), expected, rtol=0, atol=0.05 * expected.abs().max().item())
    report = sparsetorch.prune(model, ids, method="wanda", pattern="2:4", progress=False)
    assert len(report.masks) == 7 and all(p.dtype == torch.bfloat16 for p in model.parameters())


@needs_attention
def test_a_block_takes_the_pytorch_code_where_gradients_flow_and_they_equal_the_fallbacks(kernel_runs, monkeypatch):
    ours = LeanLlama.sharing(tiny_llama(layers=1))
    block = ours.model.layers[0]
    x = torch.randn(2, 24, 64)
    cos, sin = ours.positions(0, 24, x)
    linears = {m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)}

    def gradients(trained):  # of the input (when trained is None: it and every parameter) or of `trained` alone
        block.zero_grad()
        for p in block.parameters():
            p.requires_grad_(trained is None or p in trained)
        inputs = x.clone().requires_grad_(trained is None)
        block(inputs, cos, sin).square().sum().backward()
        wanted = [inputs, *block.parameters()] if trained is None else list(trained)
        return [t.grad.clone() for t in wanted]

    with torch.no_grad():  # no gradient wanted: the kernels run
        block(x, cos, sin)
    assert all(kernel_runs[name] for name in OP_NAMES[:4])
    runs = dict(kernel_runs)
    fast = [gradients(None)]
    assert kernel_runs == runs  # none ran where gradients flow: they have no backward
    fast.append(gradients(linears))  # the pruner's case: only the linear weights train
    runs["rms_norm"] += 1  # the block's first norm, which no gradient passes, still may take its kernel
    assert kernel_runs == runs
    assert all(g.abs().sum() > 0 for grads in fast for g in grads)
    _fallback(monkeypatch)
    plain = [gradients(None), gradients(linears)]
    for got, expected, tolerance in zip(fast, plain, (0, 1e-5), strict=True):  # the kernel norm: to float rounding
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=tolerance * float(e.abs().max()))
