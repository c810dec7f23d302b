"""Which model calibration runs, and what each block is fed: our model for Llama-like families,
transformers' own blocks with their recorded arguments for the others."""

import pytest
import torch
from torch import nn

from conftest import calibration_ids, tiny_llama
from sparsetorch.models.llama import LeanLlama
from sparsetorch.oneshot.capture import _capture, block_batches, calibration_model
from sparsetorch.targets import find_targets


def _targets(model):
    return find_targets(model, None, ("lm_head",))


def _gpt2(layers=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=64, vocab_size=128, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _gemma2(layers=3):
    """Sliding-window and full-attention blocks alternate: the blocks get different masks."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma-2")
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4)
    return transformers.Gemma2ForCausalLM(config).eval()


# ---- calibration_model ----------------------------------------------------------------


def test_llama_calibrates_our_model_over_the_very_same_parameters():
    model = tiny_llama()
    targets = _targets(model)
    ours, mapped = calibration_model(model, targets, tokens=32)
    assert isinstance(ours, LeanLlama)
    assert list(mapped) == list(targets)
    modules = dict(ours.named_modules())
    for name, module in mapped.items():
        assert module is modules[name]
        assert module.weight is targets[name].weight
    with torch.no_grad():
        mapped["model.layers.0.mlp.up_proj"].weight.zero_()
    assert not model.model.layers[0].mlp.up_proj.weight.any()  # a write to ours is a write to transformers'


def test_gpt2_calibrates_itself():
    model = _gpt2()
    targets = _targets(model)
    runner, mapped = calibration_model(model, targets, tokens=32)
    assert runner is model and mapped is targets


def test_an_explicit_blocks_path_calibrates_the_model_itself():
    model = tiny_llama()
    targets = _targets(model)
    runner, mapped = calibration_model(model, targets, tokens=32, blocks="model.layers")
    assert runner is model and mapped is targets


@pytest.mark.parametrize("window,ours", [(16, False), (32, True), (None, True)])
def test_mistral_calibrates_itself_only_when_its_window_is_shorter_than_the_calibration_windows(window, ours):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=window)).eval()
    runner, _ = calibration_model(model, _targets(model), tokens=32)
    assert isinstance(runner, LeanLlama) is ours
    assert (runner is model) is not ours


def test_a_target_our_model_lacks_calibrates_the_model_itself():
    model = tiny_llama()
    targets = {**_targets(model), "model.extra": nn.Linear(64, 64)}
    runner, mapped = calibration_model(model, targets, tokens=32)
    assert runner is model and mapped is targets


# ---- block_batches: our model ------------------------------------------------------------


def _output(out):
    """A block's hidden-state output, whether or not the block returns a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _hf_block_io(model, blocks, ids):
    """(input hidden state, output) of every block in one forward of the transformers model."""
    seen = []

    def keep(block, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x, _output(out)))

    handles = [block.register_forward_hook(keep, with_kwargs=True) for block in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def test_our_model_feeds_block_0_the_token_embeddings():
    model = tiny_llama()
    ours, _ = calibration_model(model, _targets(model), tokens=16)
    chunks = list(calibration_ids(windows=4, tokens=16).split(2))
    with torch.no_grad():
        batches = block_batches(ours, ours.model.layers, chunks)
        assert len(batches.hidden) == 2
        for chunk, hidden in zip(chunks, batches.hidden):
            assert torch.equal(hidden, model.model.embed_tokens(chunk))


def test_our_blocks_compute_what_transformers_blocks_do():
    model = tiny_llama(layers=2)
    ours, _ = calibration_model(model, _targets(model), tokens=16)
    ids = calibration_ids(windows=2, tokens=16)
    with torch.no_grad():
        batches = block_batches(ours, ours.model.layers, [ids])
        for block, (x, expected) in zip(ours.model.layers, _hf_block_io(model, model.model.layers, ids), strict=True):
            (forward,) = batches.forwards(block, [x])
            torch.testing.assert_close(forward(), expected, rtol=1e-5, atol=1e-5)


# ---- block_batches: transformers' own blocks -------------------------------------------------


FAMILIES = {"gpt2": (_gpt2, "transformer.h", "transformer.ln_f"), "gemma2": (_gemma2, "model.layers", "model.norm")}


def _family(name):
    build, blocks, norm = FAMILIES[name]
    model = build()
    modules = dict(model.named_modules())
    return model, modules[blocks], modules[norm]


def _replay(batches, blocks, batch, norm):
    """Every block's output, each block run alone on the previous one's; the last one through the final
    norm, as transformers reports it in hidden_states."""
    h, states = batches.hidden[batch], [batches.hidden[batch]]
    for block in blocks:
        h = batches.run(block, batch, h)
        states.append(h)
    states[-1] = norm(states[-1])
    return states


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_arguments_reproduce_the_models_hidden_states_block_by_block(family):
    model, blocks, norm = _family(family)
    chunks = list(calibration_ids(windows=4, tokens=12).split(2))
    with torch.no_grad():
        batches = block_batches(model, blocks, chunks)
        for batch, chunk in enumerate(chunks):
            expected = model(input_ids=chunk, output_hidden_states=True, use_cache=False).hidden_states
            replayed = _replay(batches, blocks, batch, norm)
            assert len(replayed) == len(expected) == len(blocks) + 1
            for got, want in zip(replayed, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gemma2_blocks_are_recorded_with_their_own_masks():
    """Sliding-window and full-attention blocks get different masks, so the replay above needs each
    block's own arguments: block 1 run with block 0's would compute something else."""
    model, blocks, _ = _family("gemma2")
    ids = calibration_ids(windows=2, tokens=12)
    with torch.no_grad():
        _, (calls,) = _capture(model, blocks, [ids])
        sliding, full = calls[0], calls[1]
        assert not torch.equal(sliding.kwargs["attention_mask"], full.kwargs["attention_mask"])
        x, expected = _hf_block_io(model, blocks, ids)[1]
        torch.testing.assert_close(_output(blocks[1](x, *full.args, **full.kwargs)), expected)
        assert not torch.allclose(_output(blocks[1](x, *sliding.args, **sliding.kwargs)), expected, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_of_a_second_shape_are_captured_separately(family):
    model, blocks, norm = _family(family)
    ids = calibration_ids(windows=6, tokens=12)
    chunks = [ids[:2], ids[2:4], ids[4:, :7]]  # a last batch of fewer tokens
    first_block_runs = []
    blocks[0].register_forward_hook(lambda *args: first_block_runs.append(1))
    with torch.no_grad():
        batches = block_batches(model, blocks, chunks)
        assert len(first_block_runs) == 2  # one forward past block 0 per shape; the second 12-token batch stops there
        assert [h.shape[1] for h in batches.hidden] == [12, 12, 7]
        for batch, chunk in enumerate(chunks):
            expected = model(input_ids=chunk, output_hidden_states=True, use_cache=False).hidden_states
            for got, want in zip(_replay(batches, blocks, batch, norm), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_hook_is_left_on_any_block(family):
    model, blocks, _ = _family(family)
    with torch.no_grad():
        block_batches(model, blocks, list(calibration_ids(windows=4, tokens=8).split(2)))
    assert all(not block._forward_pre_hooks for block in blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_hook_is_left_on_any_block_when_the_forward_raises(family, monkeypatch):
    model, blocks, _ = _family(family)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(blocks[0], "forward", broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        block_batches(model, blocks, [calibration_ids(windows=2, tokens=8)])
    assert all(not block._forward_pre_hooks for block in blocks)
