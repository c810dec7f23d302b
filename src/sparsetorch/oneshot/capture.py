"""Running a model one decoder block at a time on calibration batches.

`capture_block_calls` stands a recorder in for every block and runs the model's
embedding part once per batch: it gives block 0's inputs and the extra arguments
(masks, rotary embeddings, ...) the model passes to each block, so any block can later
be run on its own with `block_forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["BlockCall", "Stop", "block_forward", "capture_block_calls", "model_forward"]


class Stop(Exception):
    """Raised inside a forward pass once the inputs it was run for have been seen."""


@dataclass
class BlockCall:
    """The non-hidden arguments a model passed to one block for one calibration batch."""

    args: tuple
    kwargs: dict


def model_forward(model: nn.Module, inputs: Tensor, keep_output: bool = True) -> Callable[[], Tensor | None]:
    """A thunk running the whole model on one batch (token ids for HF models)."""

    def run() -> Tensor | None:
        if hasattr(model, "config") and not inputs.is_floating_point():
            out = model(input_ids=inputs, use_cache=False)
        else:
            out = model(inputs)
        return out if keep_output else None  # whole-model calibration needs no logits

    return run


def block_forward(block: nn.Module, hidden: Tensor, call: BlockCall) -> Callable[[], Tensor]:
    """A thunk running one block on one batch, returning its hidden-state output."""

    def run() -> Tensor:
        out = block(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


class _Recorder(nn.Module):
    """Stands in for block `index`: records its inputs and passes the hidden state on."""

    def __init__(self, index: int, last: int, hidden: list[Tensor], calls: list[list[BlockCall]]) -> None:
        super().__init__()
        self.index, self.last, self.hidden, self.calls = index, last, hidden, calls

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.hidden.append(hidden)
        self.calls[self.index].append(BlockCall(args[1:], kwargs))
        if self.index == self.last:
            raise Stop
        return hidden


def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor]
) -> tuple[list[Tensor], list[list[BlockCall]]]:
    """Block 0's inputs per batch, and every block's extra arguments per batch.

    Each block keeps its own arguments because families such as Gemma-2 give
    sliding-window and full-attention blocks different masks. The blocks are always
    put back, even on error.
    """
    originals = list(blocks)
    hidden: list[Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in originals]
    try:
        for i in range(len(originals)):
            blocks[i] = _Recorder(i, len(originals) - 1, hidden, calls)
        for chunk in chunks:
            try:
                model_forward(model, chunk)()
            except Stop:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return hidden, calls
