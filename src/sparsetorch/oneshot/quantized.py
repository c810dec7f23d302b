"""Putting a pruning run's weights on value grids (`PruneConfig.quantize`), and the run's record of it.

The order, per layer, is fixed:

1. The method. SparseGPT quantizes inside its own sweep (the paper's joint mode, GPTQ-style,
   `oneshot/joint.py`): its kept weights come out on grids it found during the sweep. The other
   methods leave float weights.
2. The steps after the method: DSnoT refinement, then layer reconstruction.
3. Round to nearest (`round_layer`): the layer's final kept weights on a grid found from them.
   Every method but joint SparseGPT gets this; joint SparseGPT gets it only where step 2 changed
   its weights (otherwise its own grids stand: rounding on-grid weights to a new grid found from
   them could only add error).

Per block, with reconstruct='block': the block fit trains the kept weights, which leaves them off
their grids, so they are rounded to nearest again (the fit's `project`, in `pipeline.py`)
before the fit measures its final loss; the fit keeps them only if the rounded block still beats
its start, else it puts the start back, grids and all. The next block's inputs are the rounded
block's outputs.

After all blocks: the input embedding and an untied output embedding (lm_head), int8 per row,
round to nearest (`quantize_embeddings`): they are a large part of a small model's file, and
they are rounded last so no calibration pass depends on whether they were.

Only float32 models are quantized (`prune` refuses others up front): an int4 code times an fp16
scale needs up to 15 significant bits, which bf16 and fp16 weights cannot hold exactly.
"""

from __future__ import annotations

from torch import Tensor, nn

from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.quantize import QuantGrid, QuantScheme, fake_quantize

__all__ = ["EMBEDDING_SCHEME", "embedding_modules", "quantization_record", "quantize_embeddings", "round_layer"]

EMBEDDING_SCHEME = QuantScheme(bits=8)  # one scale per row: per token (input) or per output channel (lm_head)


def round_layer(weight: Tensor, keep: Tensor, scheme: QuantScheme) -> tuple[Tensor, QuantGrid]:
    """Round-to-nearest of `weight`'s kept entries (float32) on a grid of their own; pruned ones +0.0.

    Example:
        >>> w, grid = round_layer(torch.tensor([[0.5, 0.0, -1.0, 0.25]]), torch.tensor([[1, 0, 1, 1]]).bool(),
        ...                       QuantScheme(bits=4, group_size=2))
    """
    rounded, grid = fake_quantize(weight.float(), scheme, keep)
    return rounded.masked_fill_(~keep, 0.0), grid


def embedding_modules(model: nn.Module, skip: set[str]) -> dict[str, nn.Module]:
    """name -> module of the model's input embedding and its output embedding when untied, leaving out
    modules in `skip` (pruned layers, quantized with the layers' scheme). Empty for models without
    `get_input_embeddings` (plain modules)."""
    found: dict[str, nn.Module] = {}
    names = {module: name for name, module in model.named_modules()}
    seen: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or id(weight) in seen:
            continue  # none, or the output embedding tied to the input one
        seen.add(id(weight))
        if module in names and names[module] not in skip:
            found[names[module]] = module
    return found


def quantize_embeddings(model: nn.Module, skip: set[str]) -> dict[str, QuantGrid]:
    """Round the embeddings of `embedding_modules` to int8 per row, in place; their grids by name."""
    grids = {}
    for name, module in embedding_modules(model, skip).items():
        weight = module.weight.detach()
        rounded, grids[name] = fake_quantize(weight.float(), EMBEDDING_SCHEME)
        weight.copy_(rounded.to(weight.dtype))
    return grids


def quantization_record(config: PruneConfig, embeddings: list[str]) -> dict:
    """The 'quantization' entry of `PruneReport.to_dict()`: the scheme, how the layers got onto it
    ('gptq': inside SparseGPT's sweep; 'rtn': round to nearest), the order of the steps (see the
    module docstring), and the embeddings rounded."""
    scheme, joint = config.scheme, config.joint_quantization
    order = ["sparsegpt joint sweep (gptq)" if joint else config.method]
    order += ["dsnot"] if config.refine == "dsnot" else []
    order += ["layer reconstruction"] if config.reconstruct is not None else []
    if not joint:
        order.append("round to nearest")
    elif len(order) > 1:
        order.append("round to nearest where a step changed the weights")
    if config.reconstruct == "block":
        order += ["block reconstruction", "round to nearest (kept if the block still beats its start)"]
    if embeddings:
        order.append(f"embeddings: {EMBEDDING_SCHEME.name} per row, round to nearest")
    return {
        "scheme": scheme.name,
        **scheme.to_dict(),
        "method": "gptq" if joint else "rtn",
        "order": order,
        "embeddings": {"scheme": EMBEDDING_SCHEME.name, "method": "rtn", "modules": embeddings} if embeddings else None,
    }
