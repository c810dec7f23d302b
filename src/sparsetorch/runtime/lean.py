"""Load a pruned (or any Llama-family) model directory into sparsetorch's own model, `models.llama`,
dense from its safetensors or sparse through `load_sparse_model`: no transformers in the process."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsetorch.formats.checkpoint import WEIGHTS_FILE
from sparsetorch.models.llama import LeanConfig, LeanLlama
from sparsetorch.runtime.config import RuntimeConfig
from sparsetorch.runtime.dense import dense_kernels
from sparsetorch.runtime.fuse import fuse_projections
from sparsetorch.runtime.loader import assign_weights, load_sparse_model
from sparsetorch.runtime.report import CompileReport
from sparsetorch.runtime.timing import Timer

__all__ = ["VARIANTS", "lean_skeleton", "lean_supports", "load_lean_model"]

VARIANTS = ("dense", "dense-bf16", "sparse")


def lean_supports(directory: str | Path) -> bool:
    """Whether the own model runs the model of `directory/config.json` (False without one)."""
    try:
        LeanConfig.from_directory(directory)
    except (NotImplementedError, ValueError, FileNotFoundError):
        return False
    return True


def lean_skeleton(directory: str | Path) -> LeanLlama:
    """The LeanLlama of `directory/config.json`, every parameter on the meta device (no memory, no values).

    Raises:
        NotImplementedError, ValueError, FileNotFoundError: see `LeanConfig.from_directory`.
    """
    config = LeanConfig.from_directory(directory)
    with torch.device("meta"):
        return LeanLlama(config)


def load_lean_model(directory: str | Path, variant: str = "dense", runtime: RuntimeConfig | None = None,
                    timer: Timer | None = None, fuse: bool = True) -> tuple[LeanLlama, CompileReport | None]:
    """A `sparsetorch prune` output directory (or any Llama-family HF directory, for 'dense') as a LeanLlama.

    Args:
        variant: 'dense': the weights of `directory/model.safetensors`; 'dense-bf16': those with the
            Linear weights rounded to bf16; 'sparse': the compressed weights through
            `load_sparse_model` (SparseLinear layers, never a dense copy of them). Dense Linear
            layers run the small-batch kernels of `runtime.dense` (fp32 activations throughout).
        runtime, timer: as for `load_sparse_model` ('sparse' only).
        fuse: stack each block's q/k/v and gate/up projections into one where they agree
            (`runtime.fuse_projections`): fewer kernel calls per token, the same results.

    Returns:
        (the model in eval mode, the CompileReport of its layers for 'sparse', else None).

    Raises:
        ValueError: an unknown variant.
        NotImplementedError: a model the own model does not run (see `LeanConfig.from_dict`).
        FileNotFoundError: no such weights.

    Example:
        >>> model, report = load_lean_model("pruned/smollm2-70", "sparse")
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    directory = Path(directory)
    if variant == "sparse":
        model, report = load_sparse_model(directory, runtime, timer, skeleton=lean_skeleton)
    else:
        path = directory / WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; the dense variant needs the model's safetensors weights")
        model, report = lean_skeleton(directory), None
        assign_weights(model, load_file(path), {}, directory)
    if fuse:
        fuse_projections(model)
    dense_kernels(model, torch.bfloat16 if variant == "dense-bf16" else torch.float32,
                  runtime.backend if runtime is not None else "auto")
    return model.eval(), report
