"""Which model the block pipeline runs, and what each of its blocks is fed for every calibration batch.

The pipeline runs one decoder block at a time, so it needs block 0's inputs for each batch and a
way to run any block alone:
- For the families sparsetorch's own model implements (`families.FAMILIES`, `own_model`), it runs
  that model, built over the very parameters of the transformers model (`LeanLlama.sharing`):
  block 0's inputs are the token embeddings, and every block takes the rotary angles of the
  window's positions.
- For any other model, transformers' own blocks run unmodified. One forward per batch, with a hook
  before each block, records what the model passes each block besides the hidden state (masks,
  position embeddings, ...); they depend on the batch's shape only, so after the first batch of a
  shape the forward ends at block 0 and later batches reuse those arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from sparsetorch.families import family_of
from sparsetorch.models.llama import LeanLlama
from sparsetorch.models.packed import PackedWeights

__all__ = ["BlockBatches", "BlockCall", "StopForward", "block_batches", "calibration_model", "model_forward",
           "stopping"]


class StopForward(Exception):
    """Raised inside a forward once everything it was run for has been seen."""


@contextmanager
def stopping() -> Iterator[None]:
    """Let a forward end early by raising StopForward."""
    try:
        yield
    except StopForward:
        pass


def calibration_model(model: nn.Module, targets: dict[str, nn.Module], tokens: int,
                      blocks: str | None = None) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The model the pipeline runs and the target layers in it: sparsetorch's own model over `model`'s
    parameters where it computes `model` (for windows of `tokens`) and holds every target by name;
    else `model` itself. An explicit `blocks` path always means `model`."""
    family = family_of(model)
    if blocks is not None or family is None or family.own_model is None:
        return model, targets
    ours = LeanLlama.sharing(model, PackedWeights())
    if ours is None or (ours.config.sliding_window or tokens) < tokens:
        return model, targets
    modules = dict(ours.named_modules())
    if any(name not in modules for name in targets):
        return model, targets
    return ours, {name: modules[name] for name in targets}


def model_forward(model: nn.Module, inputs: Tensor) -> Callable[[], None]:
    """A thunk running the whole model on one batch (token ids for HF models), for calibration."""

    def run() -> None:
        if hasattr(model, "config") and not inputs.is_floating_point():
            model(input_ids=inputs, use_cache=False)
        else:
            model(inputs)

    return run


@dataclass
class BlockBatches:
    """Block 0's inputs per calibration batch, and `run(block, batch index, hidden) -> block output`."""

    hidden: list[Tensor]
    run: Callable[[nn.Module, int, Tensor], Tensor]

    def forwards(self, block: nn.Module, hidden: list[Tensor]) -> list[Callable[[], Tensor]]:
        """One thunk per batch running `block` on that batch's input `hidden[i]`."""
        return [partial(self.run, block, i, h) for i, h in enumerate(hidden)]


def block_batches(model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor]) -> BlockBatches:
    """What `blocks` are fed for each batch of token ids in `chunks` (see the module docstring)."""
    if isinstance(model, LeanLlama):
        return _own_model_batches(model, chunks)
    return _transformers_batches(model, blocks, chunks)


def _own_model_batches(model: LeanLlama, chunks: list[Tensor]) -> BlockBatches:
    angles: dict[int, tuple[Tensor, Tensor]] = {}

    def run(block: nn.Module, batch: int, hidden: Tensor) -> Tensor:
        tokens = hidden.shape[1]
        if tokens not in angles:
            angles[tokens] = model.positions(0, tokens, hidden)  # cos, sin (1, T, head_dim)
        return block(hidden, *angles[tokens])

    return BlockBatches([model.model.embed_tokens(chunk) for chunk in chunks], run)


@dataclass
class BlockCall:
    """The arguments besides the hidden state that a model passed to one block."""

    args: tuple
    kwargs: dict


def _transformers_batches(model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor]) -> BlockBatches:
    hidden, calls = _capture(model, blocks, chunks)
    index = {block: i for i, block in enumerate(blocks)}

    def run(block: nn.Module, batch: int, x: Tensor) -> Tensor:
        call = calls[batch][index[block]]
        out = block(x, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return BlockBatches(hidden, run)


def _capture(model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor]) -> tuple[list[Tensor], list[list[BlockCall]]]:
    """Block 0's input and every block's other arguments, per batch. Each block keeps its own
    arguments: families such as Gemma-2 give sliding-window and full-attention blocks different masks."""
    hidden: list[Tensor] = []
    calls: list[list[BlockCall]] = []
    by_shape: dict[tuple[int, ...], list[BlockCall]] = {}
    for chunk in chunks:
        known = by_shape.get(tuple(chunk.shape))
        recorded: list[BlockCall] = []
        hooks = [block.register_forward_pre_hook(partial(_record, i, len(blocks), known, hidden, recorded),
                                                 with_kwargs=True) for i, block in enumerate(blocks)]
        try:
            with stopping():
                model_forward(model, chunk)()
        finally:
            for hook in hooks:
                hook.remove()
        calls.append(recorded if known is None else [recorded[0], *known[1:]])
        by_shape.setdefault(tuple(chunk.shape), recorded)
    return hidden, calls


def _record(index: int, count: int, known: list[BlockCall] | None, hidden: list[Tensor], recorded: list[BlockCall],
            block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of block `index`: record its arguments; end the forward once nothing more is needed."""
    kwargs = dict(kwargs)
    x = args[0] if args else kwargs.pop("hidden_states")
    if index == 0:
        hidden.append(x)
    recorded.append(BlockCall(args[1:], kwargs))
    if known is not None or index == count - 1:
        raise StopForward
