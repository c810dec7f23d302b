"""Model-family knowledge, in one table: where each family keeps its decoder blocks, and which
families sparsetorch's own model implementation runs, with what each of those differs in.

The block pipeline needs only the block path: which linears a block holds, in which order they
run and which share an input are discovered by running the block, so a new family is one row
here (or `blocks="path.to.layers"` at call time). A family with `own_model` set is calibrated
and run by `sparsetorch.models.llama` instead of transformers' modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["FAMILIES", "LLAMA_LIKE", "Family", "family_of", "find_blocks", "model_type", "resolve_path"]

LLAMA_LIKE = "llama-like"  # `Family.own_model` of the families `sparsetorch.models.llama` implements


@dataclass(frozen=True)
class Family:
    """What sparsetorch knows of one Hugging Face `config.model_type`.

    Args:
        blocks: dotted path of the ModuleList of decoder blocks.
        own_model: which of sparsetorch's own implementations runs the family (`LLAMA_LIKE`), or None.
        qkv_bias: whether q/k/v projections carry biases; None: `config.attention_bias` says.
        window_key: the config key of a sliding window that the sequence must stay within (the own
            implementation applies no window mask), or None.
        refused_flags: config flags that, when true, ask for something the own implementation does
            not compute.
    """

    blocks: str
    own_model: str | None = None
    qkv_bias: bool | None = None
    window_key: str | None = None
    refused_flags: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", own_model=LLAMA_LIKE),
    "mistral": Family("model.layers", own_model=LLAMA_LIKE, window_key="sliding_window"),
    "qwen2": Family("model.layers", own_model=LLAMA_LIKE, qkv_bias=True, refused_flags=("use_sliding_window",)),
    "mixtral": Family("model.layers"),
    "qwen3": Family("model.layers"),
    "gemma": Family("model.layers"),
    "gemma2": Family("model.layers"),
    "gemma3_text": Family("model.layers"),
    "phi3": Family("model.layers"),
    "olmo": Family("model.layers"),
    "olmo2": Family("model.layers"),
    "granite": Family("model.layers"),
    "smollm3": Family("model.layers"),
    "gpt2": Family("transformer.h"),
    "gptj": Family("transformer.h"),
    "bloom": Family("transformer.h"),
    "falcon": Family("transformer.h"),
    "opt": Family("model.decoder.layers"),
    "gpt_neox": Family("gpt_neox.layers"),
}


def model_type(model: nn.Module) -> str:
    """`config.model_type` of a Hugging Face model, or the class name of any other module."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def family_of(model: nn.Module) -> Family | None:
    """The table's row for `model`'s family, or None for a family (or plain module) it lacks."""
    return FAMILIES.get(model_type(model))


def resolve_path(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted `path`, or ValueError naming the part that is missing."""
    module = model
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"model has no submodule {path!r} (no {part!r} under {type(module).__name__})")
        module = getattr(module, part)
    return module


def find_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList | None:
    """The model's decoder blocks, by explicit `path` or by its family; None if unknown.

    Raises:
        ValueError: `path` does not lead to a ModuleList.
    """
    if path is None:
        family = family_of(model)
        if family is None:
            return None
        path = family.blocks
    blocks = resolve_path(model, path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"blocks={path!r} must name a non-empty ModuleList of blocks, got {type(blocks).__name__}")
    return blocks
