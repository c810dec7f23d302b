"""Shared fixtures: tiny models built in the test, and the bundled tokenizer when present."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(vocab: int = 128, layers: int = 2, tie: bool = False, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def nm_weight(rows: int, cols: int, n: int, m: int) -> torch.Tensor:
    """A random (rows, cols) weight keeping the n largest of every m along the input dimension."""
    dense = torch.randn(rows, cols)
    groups = dense.view(rows, -1, m)
    keep = groups.abs().topk(n, dim=-1).indices
    return torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).view(rows, cols)



def structure_weight(structure: str, rows: int, cols: int) -> torch.Tensor:
    """A random weight an index structure can hold: 2:4 for 'nm', no zeros for 'dense', else 50% zeros."""
    if structure == "nm":
        return nm_weight(rows, cols, 2, 4)
    if structure == "dense":
        return torch.randn(rows, cols)
    return torch.randn(rows, cols) * (torch.rand(rows, cols) > 0.5)

def calibration_ids(vocab: int = 128, windows: int = 8, tokens: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (windows, tokens), generator=torch.Generator().manual_seed(seed))


def _train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in a second on CPython's own docs: offline, real."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(topics.values())[:200], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-block Llama with its own tokenizer, saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tokenizer = _train_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tokenizer), tie=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """Calibration and evaluation text files, disjoint halves of CPython's language reference."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("text")
    keys = sorted(topics)
    (root / "calib.txt").write_text("\n".join(topics[k] for k in keys[: len(keys) // 2]))
    (root / "eval.txt").write_text("\n".join(topics[k] for k in keys[len(keys) // 2:]))
    return root / "calib.txt", root / "eval.txt"
