"""Dense fp32 and bf16 weights on the small-batch kernels (`kernels/csrc/dense.h`, `runtime.dense`):
every ISA against F.linear, the GEMM above 8 rows, and the lean decoder's dense variants."""

import pytest
import torch
import torch.nn.functional as F

from sparsetorch.formats.dense import DenseTensor
from sparsetorch.kernels.cpu_features import ISAS, supported_isas
from sparsetorch.kernels.dispatch import kernel_name
from sparsetorch.models.llama import LeanConfig, LeanLlama
from sparsetorch.nn import SparseLinear
from sparsetorch.runtime.dense import dense_kernels
from sparsetorch.runtime.lean import load_lean_model


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "cols"), [(37, 70), (64, 576), (5, 3), (1, 16)])
def test_dense_kernel_equals_f_linear_of_the_same_weight(isa, dtype, rows, cols):
    if isa not in supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    weight, bias = torch.randn(rows, cols).to(dtype), torch.randn(rows)
    layer = SparseLinear(DenseTensor((rows, cols), weight), bias, isa)
    for batch in (1, 2, 3, 7, 8):
        x = torch.randn(batch, cols)
        assert layer.kernel(x) == isa
        torch.testing.assert_close(layer(x), F.linear(x, weight.float(), bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_than_eight_rows_take_a_gemm(dtype):
    weight, bias = torch.randn(24, 40).to(dtype), torch.randn(24)
    layer = SparseLinear(DenseTensor((24, 40), weight), bias)
    x = torch.randn(3, 7, 40)  # 21 rows
    expected = F.linear(x, weight.float(), bias)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: the GEMM rounds the activations too
    torch.testing.assert_close(layer(x), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_other_activations_take_the_pytorch_code():
    layer = SparseLinear(DenseTensor((4, 8), torch.randn(4, 8)))
    assert kernel_name(layer.sparse_weight, torch.randn(1, 8, dtype=torch.float64)) == "torch"
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.sparse_weight.values.double()))


def _model(tie=True):
    config = LeanConfig(model_type="llama", vocab_size=80, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6,
                        rope_theta=10000.0, tie_word_embeddings=tie)
    model = LeanLlama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_dense_kernels_replace_every_linear_and_keep_the_logits():
    model = _model()
    ids = torch.randint(0, 80, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids)
    names = dense_kernels(model)
    assert len(names) == 2 * 7 + 1 and not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.lm_head.sparse_weight.values.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # no copy
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        dense_kernels(_model(), torch.float16)


def test_bf16_weights_compute_in_fp32_what_the_rounded_weights_give():
    model = _model(tie=False)  # tied, rounding lm_head would round the embedding too
    rounded = _model(tie=False)
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.endswith("proj.weight") or name == "lm_head.weight":
                p.copy_(p.bfloat16().float())
    dense_kernels(model, torch.bfloat16)
    assert model.model.layers[0].mlp.down_proj.sparse_weight.values.dtype == torch.bfloat16
    cache = model.new_cache()
    ids = torch.randint(0, 80, (1, 5), generator=torch.Generator().manual_seed(1))
    model(ids, cache)
    reference_cache = rounded.new_cache()
    rounded(ids, reference_cache)
    step = torch.tensor([[7]])  # a decode step: the rows kernel, fp32 activations
    torch.testing.assert_close(model(step, cache), rounded(step, reference_cache), rtol=1e-4, atol=1e-4)


def test_the_lean_decoder_loads_dense_bf16(tiny_model_dir):
    fp32, _ = load_lean_model(tiny_model_dir, "dense")
    bf16, _ = load_lean_model(tiny_model_dir, "dense-bf16")
    assert isinstance(bf16.model.layers[0].self_attn.qkv_proj, SparseLinear)
    assert bf16.model.layers[0].self_attn.qkv_proj.sparse_weight.values.dtype == torch.bfloat16
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    a, b = fp32(ids), bf16(ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    with pytest.raises(ValueError, match="variant must be one of"):
        load_lean_model(tiny_model_dir, "dense-fp16")
