"""Block-causal calibration attention against transformers' own SDPA attention."""

import pytest
import torch

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot.attention import CHUNK, block_causal_attention, calibration_attention


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 3


@pytest.mark.parametrize("tokens", [2 * CHUNK, 2 * CHUNK + 37, CHUNK - 1])
def test_block_causal_attention_equals_sdpa(tokens):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 6, tokens, 16), torch.randn(2, 2, tokens, 16), torch.randn(2, 2, tokens, 16)
    module = _Attention()
    module.num_key_value_groups = 3
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    got, _ = block_causal_attention(module, query, key, value, None, scaling=0.25)
    assert got.shape == expected.shape == (2, tokens, 6, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_mask_goes_to_sdpa_unchanged():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    query = key = value = torch.randn(1, 2, 2 * CHUNK, 8)
    mask = torch.rand(1, 1, 2 * CHUNK, 2 * CHUNK) > 0.3
    mask[..., 0] = True
    module = _Attention()
    module.num_key_value_groups = 1
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    got, _ = block_causal_attention(module, query, key, value, mask)
    assert torch.equal(got, expected)


def test_pruning_runs_block_causal_attention_with_the_same_masks_and_restores_sdpa(monkeypatch):
    """The pipeline's calibration attention changes timing, not results (beyond float rounding)."""
    import sparsetorch.oneshot.attention as attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])
        return block_causal_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "block_causal_attention", counted)
    ids = calibration_ids(windows=4, tokens=2 * CHUNK + 16)
    reports = []
    for implementation in ("sdpa", "eager"):  # 'eager' is left alone: the reference
        torch.manual_seed(0)
        model = tiny_llama()
        model.config._attn_implementation = implementation
        reports.append(sparsetorch.prune(model, ids, method="wanda", pattern="2:4", progress=False))
        assert model.config._attn_implementation == implementation
    assert calls and set(calls) == {2 * CHUNK + 16}
    for name, keep in reports[0].masks.items():
        assert (keep == reports[1].masks[name]).float().mean() > 0.999, name


def test_other_modules_are_left_alone():
    model = torch.nn.Linear(2, 2)
    with calibration_attention(model):
        pass
    assert not hasattr(model, "config")
