"""sparsetorch's own Llama-family model (`models/llama.py`) against transformers' own models: loaded
by the lean decoder (`runtime/lean.py`), dense and sparse, and built over a transformers model's
very parameters for calibration (`LeanLlama.sharing`)."""

import json

import pytest
import torch

import sparsetorch
from conftest import calibration_ids
from sparsetorch.evaluate.speed import greedy_decode
from sparsetorch.formats.pruned import load_pruned, save_pruned
from sparsetorch.models.llama import LeanConfig, LeanLlama
from sparsetorch.models.packed import PackedWeights
from sparsetorch.nn import SparseLinear
from sparsetorch.runtime import RuntimeConfig
from sparsetorch.runtime.lean import lean_supports, load_lean_model
from sparsetorch.targets import set_weight_matrix

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2)),
    "llama-gqa-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mha-biases-theta": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                             head_dim=8, rope_theta=500000.0)),
    "mistral": ("mistral", dict(num_key_value_heads=1)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def hf_model(family: str, **options):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **{**SHAPE, **options})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random norms and biases, so that getting them wrong shows
            if name.endswith(("bias", "norm.weight")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    family, options = FAMILIES[request.param]
    torch.manual_seed(0)
    model = hf_model(family, **options)
    path = tmp_path_factory.mktemp("lean") / request.param
    model.save_pretrained(path)
    return model, path


def test_prefill_and_every_decode_step_match_transformers(saved):
    hf, path = saved
    lean, report = load_lean_model(path)
    assert report is None and not any(p.is_meta for p in lean.parameters())
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens, _ = greedy_decode(hf, prompt, 16)
    assert torch.equal(greedy_decode(lean, prompt, 16)[0], tokens)
    with torch.no_grad():
        reference = hf(torch.cat([prompt[0], tokens[:-1]])[None]).logits[0]  # (7 + 15, vocab)
    atol = 1e-5 * reference.abs().max().item()
    cache = lean.new_cache(capacity=4)  # grows twice on the way
    logits = [lean(prompt, cache)] + [lean(token.view(1, 1), cache) for token in tokens[:-1]]
    for step, got in enumerate(logits):
        torch.testing.assert_close(got[0], reference[6 + step], rtol=0, atol=atol)
    assert cache.length == 22 and cache.capacity == 32


def test_a_chunk_after_a_cache_sees_the_cache_and_itself(saved):
    hf, path = saved
    lean, _ = load_lean_model(path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids).logits
    cache = lean.new_cache(batch=2)
    lean(ids[:, :4], cache)
    atol = 1e-5 * reference.abs().max().item()
    torch.testing.assert_close(lean(ids[:, 4:], cache), reference[:, -1], rtol=0, atol=atol)
    torch.testing.assert_close(lean(ids), reference[:, -1], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = hf_model("llama", num_key_value_heads=2, tie_word_embeddings=True)
    report = sparsetorch.prune(model, calibration_ids(), method="wanda", pattern="unstructured", sparsity=0.7)
    return save_pruned(model, tmp_path_factory.mktemp("lean-pruned") / "70", report.to_dict())


def test_sparse_weights_in_the_lean_decoder_give_the_dense_tokens(pruned_dir):
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    dense, _ = load_lean_model(pruned_dir, "dense")
    sparse, report = load_lean_model(pruned_dir, "sparse", RuntimeConfig(policy="always"))
    assert len(report.replaced) == 14
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 8 + 1  # q/k/v, gate/up stacked; lm_head
    tied = sparse.lm_head.sparse_weight.values  # the dense kernels' view of the embedding: no copy
    assert tied.data_ptr() == sparse.model.embed_tokens.weight.data_ptr()
    tokens = greedy_decode(load_pruned(pruned_dir), prompt, 16)[0]
    assert torch.equal(greedy_decode(dense, prompt, 16)[0], tokens)
    assert torch.equal(greedy_decode(sparse, prompt, 16)[0], tokens)
    torch.testing.assert_close(sparse(prompt), dense(prompt), rtol=1e-4, atol=1e-5)


def write_config(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SHAPE, **fields}))
    return tmp_path


def test_families_and_features_it_does_not_run_are_refused_with_the_way_out(tmp_path):
    with pytest.raises(NotImplementedError, match=r"runs model_type .*'llama'.*not 'gpt2'; use decoder='transformers'"):
        LeanConfig.from_directory(write_config(tmp_path, model_type="gpt2"))
    with pytest.raises(NotImplementedError, match="rope type 'default', not 'linear'"):
        LeanConfig.from_directory(write_config(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(NotImplementedError, match="hidden_act 'silu', not 'gelu'"):
        LeanConfig.from_directory(write_config(tmp_path, hidden_act="gelu"))
    with pytest.raises(NotImplementedError, match=r"does not compute use_sliding_window=true .*use decoder='transformers'"):
        LeanConfig.from_directory(write_config(tmp_path, model_type="qwen2", use_sliding_window=True))
    assert not lean_supports(tmp_path) and not lean_supports(tmp_path / "missing")
    assert lean_supports(write_config(tmp_path, rope_scaling=None, rope_theta=1e4))
    with pytest.raises(ValueError, match="variant must be one of"):
        load_lean_model(tmp_path, "bitmask")


def test_a_sequence_past_the_sliding_window_is_refused(tmp_path):
    model = LeanLlama(LeanConfig.from_dict({"model_type": "mistral", **SHAPE, "sliding_window": 8}))
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"9 tokens exceed the sliding window \(8\)"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _every_position(ours, ids):
    """Logits of every position, block by block as calibration runs them (`forward` gives the last one's)."""
    with torch.no_grad():
        x = ours.model.embed_tokens(ids)
        cos, sin = ours.positions(0, ids.shape[1], x)
        for block in ours.model.layers:
            x = block(x, cos, sin)
        return ours.lm_head(ours.model.norm(x))


@pytest.mark.parametrize("packed", [False, True], ids=["nn.Linear", "packed"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sharing_computes_transformers_logits_over_its_very_parameters(name, packed):
    family, options = FAMILIES[name]
    hf = hf_model(family, **options)
    ours = LeanLlama.sharing(hf, PackedWeights() if packed else None)
    assert ours is not None and not ours.training
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    mine = dict(ours.named_parameters(remove_duplicate=False))
    assert mine.keys() == theirs.keys()
    assert all(mine[key] is parameter for key, parameter in theirs.items())  # the very objects, no copies
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = hf(ids).logits
    atol = 1e-5 * reference.abs().max().item()
    torch.testing.assert_close(_every_position(ours, ids), reference, rtol=0, atol=atol)
    torch.testing.assert_close(ours(ids), reference[:, -1], rtol=0, atol=atol)


def test_a_write_to_a_shared_weight_reaches_both_models():
    hf = hf_model("qwen2", num_key_value_heads=2)
    ours = LeanLlama.sharing(hf, PackedWeights())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    before = ours(ids)
    for layer in hf.model.layers:  # in place, as pruning writes, through transformers' modules
        weight = layer.mlp.down_proj.weight
        set_weight_matrix(layer.mlp.down_proj, weight * (torch.rand_like(weight) > 0.5))
    with torch.no_grad():
        reference = hf(ids).logits[:, -1]
    after = ours(ids)
    assert not torch.allclose(after, before, rtol=0, atol=1e-3)
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


def test_a_tied_model_keeps_the_tie():
    hf = hf_model("llama", num_key_value_heads=2, tie_word_embeddings=True)
    ours = LeanLlama.sharing(hf)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight is hf.model.embed_tokens.weight
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    untied = hf_model("llama", num_key_value_heads=2)
    ours = LeanLlama.sharing(untied)
    assert ours.lm_head.weight is untied.lm_head.weight and ours.lm_head.weight is not ours.model.embed_tokens.weight


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _with_extra_parameter():
    model = hf_model("llama", num_key_value_heads=2)
    model.model.layers[0].self_attn.register_parameter("extra", torch.nn.Parameter(torch.ones(4)))
    return model


DECLINED = {
    "gpt2": _gpt2,
    "llama3 rope": lambda: hf_model("llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear rope": lambda: hf_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gelu": lambda: hf_model("llama", hidden_act="gelu"),
    "qwen2 sliding window": lambda: hf_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0),
    "attention dropout in training": lambda: hf_model("llama", attention_dropout=0.1).train(),
    "a parameter it does not compute": _with_extra_parameter,
    "a plain module": lambda: torch.nn.Linear(4, 4),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_sharing_declines_what_it_does_not_compute(case):
    assert LeanLlama.sharing(DECLINED[case]()) is None


def test_sharing_follows_training_mode_where_it_computes_it():
    assert LeanLlama.sharing(hf_model("llama", attention_dropout=0.1)) is not None  # eval: no dropout
    ours = LeanLlama.sharing(hf_model("llama").train())
    assert ours is not None and ours.training


@pytest.mark.slow
def test_the_bundled_model_decodes_the_same_tokens_as_transformers():
    from sparsetorch.models import bundled_gguf, load_model

    try:
        bundled_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tokenizer, path = load_model(None, progress=False)
    prompt = tokenizer("ROMEO.\nBut soft, what light through yonder window breaks?\n", return_tensors="pt")["input_ids"]
    lean, _ = load_lean_model(path)
    assert torch.equal(greedy_decode(lean, prompt, 16)[0], greedy_decode(model, prompt, 16)[0])
