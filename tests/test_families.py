"""Every family the README names, end to end on a tiny random config: prune (Wanda and SparseGPT at
2:4), save, load in plain transformers, and run through the sparse runtime with the same greedy tokens."""

import pytest
import torch

import sparsetorch
from conftest import calibration_ids
from sparsetorch.families import FAMILIES, find_blocks
from sparsetorch.formats.pruned import load_pruned, save_pruned
from sparsetorch.runtime import RuntimeConfig, load_sparse_model

VOCAB, HIDDEN, INNER, HEADS = 128, 64, 128, 4


def _config(family: str, vocab: int = VOCAB):
    """A tiny random config of `family` whose every linear takes 2:4 (dimensions divisible by 4)."""
    import transformers as t

    llama_like = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=2)

    builders = {
        "llama": lambda: t.LlamaConfig(**llama_like),
        "mistral": lambda: t.MistralConfig(**llama_like),
        "qwen2": lambda: t.Qwen2Config(**llama_like),
        "qwen3": lambda: t.Qwen3Config(**llama_like, head_dim=16),
        "gemma": lambda: t.GemmaConfig(**llama_like, head_dim=16),
        "phi3": lambda: t.Phi3Config(**llama_like, pad_token_id=0),
        "olmo": lambda: t.OlmoConfig(**llama_like),
        "gpt2": lambda: t.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64),
        "gptj": lambda: t.GPTJConfig(vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=HEADS, rotary_dim=8,
                                     n_positions=64),
        "opt": lambda: t.OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=INNER, num_hidden_layers=2,
                                   num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=64),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INNER,
                                            num_hidden_layers=2, num_attention_heads=HEADS),
        "falcon": lambda: t.FalconConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=HEADS, new_decoder_architecture=False),
        "bloom": lambda: t.BloomConfig(vocab_size=vocab, hidden_size=HIDDEN, n_layer=2, n_head=HEADS),
    }
    return builders[family]()


NAMED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "gpt2", "gptj", "opt", "gpt_neox", "falcon",
         "bloom"]


def test_every_named_family_has_a_row():
    assert set(NAMED) <= set(FAMILIES)


def _greedy(model, prompt, steps=6):
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", NAMED)
def test_a_family_prunes_saves_loads_and_runs_sparse(family, method, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    assert find_blocks(model) is not None
    report = sparsetorch.prune(model, calibration_ids(VOCAB, windows=4, tokens=16), method=method, pattern="2:4",
                               progress=False)
    assert report.sparsity == 0.5 and len(report.layers) >= 8
    out = save_pruned(model, tmp_path / family, report.to_dict())
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    compressed = load_pruned(out, compressed=True)
    sparse, compiled = load_sparse_model(out, RuntimeConfig(policy="always"))
    assert len(compiled.replaced) == len(report.layers)
    prompt = calibration_ids(VOCAB, windows=1, tokens=5, seed=3)
    tokens = _greedy(plain, prompt)
    assert _greedy(compressed, prompt) == tokens
    assert _greedy(sparse, prompt) == tokens
