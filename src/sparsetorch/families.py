"""Model-family knowledge, in one place: where each architecture keeps its decoder blocks.

That is all the block pipeline needs to know. Which linears a block holds, in which
order they run and which share an input are discovered by running the block, so a
new family is one line here (or `blocks="path.to.layers"` at call time).
"""

from __future__ import annotations

from torch import nn

__all__ = ["BLOCK_PATHS", "find_blocks", "resolve_path"]

# Hugging Face `config.model_type` -> dotted path of the ModuleList of decoder blocks.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "smollm3": "model.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}


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
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        path = BLOCK_PATHS.get(model_type)
        if path is None:
            return None
    blocks = resolve_path(model, path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"blocks={path!r} must name a non-empty ModuleList of blocks, got {type(blocks).__name__}")
    return blocks


def model_type(model: nn.Module) -> str:
    """`config.model_type` of a Hugging Face model, or the class name of any other module."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
