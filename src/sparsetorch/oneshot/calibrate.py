"""Calibrating and pruning the layers of one block: the papers' way, and a registry for others.

The reference, `layer_inputs="dense"` (the Wanda and SparseGPT papers' way, and llm-compressor's):
a forward of the still-dense block over every calibration batch gathers each target layer's input
statistic, every layer is pruned, and a forward of the pruned block makes the next block's inputs.
Layers fed the very same tensor (q/k/v, gate/up) share one statistic and are solved together.

Other orders of the same work register here under their own name (`oneshot/lockstep.py`: 'mixed'
and 'pruned'); `PruneConfig.layer_inputs` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from sparsetorch.oneshot.capture import StopForward, stopping
from sparsetorch.oneshot.stats import Statistic

__all__ = ["LAYER_INPUTS", "BlockWork", "LayerInputs", "LayerPruner", "DenseInputs", "SharedInputStatistics",
           "gather_statistics", "input_of", "pre_hooks", "register_layer_inputs"]


class LayerPruner(Protocol):
    """What a strategy needs of the pipeline's pruner: the statistic its method wants, and solving."""

    statistic: type[Statistic]
    names: dict[nn.Module, str]

    def prune_group(self, modules: list[nn.Module], stat: Statistic) -> None: ...


@dataclass
class BlockWork:
    """One block's calibration work.

    Args:
        pending: the block's target layers not yet pruned; a strategy removes each one it prunes.
        forwards: one thunk per calibration batch running the block and returning its output.
        pruner: solves layers from their statistic.
        want_outputs: whether the pruned block's outputs are wanted (the last block's feed nothing).
        precision: the context of forwards that only gather statistics (bf16 autocast, or nothing).
        layout: pending layer -> its name within the block (for strategies that learn per layout).
    """

    pending: set[nn.Module]
    forwards: list[Callable[[], Tensor]]
    pruner: LayerPruner
    want_outputs: bool = True
    precision: Callable[[], AbstractContextManager] = nullcontext
    layout: dict[nn.Module, str] = field(default_factory=dict)


LayerInputs = Callable[[BlockWork], "list[Tensor] | None"]  # prunes work.pending; the pruned block's outputs
LAYER_INPUTS: dict[str, type] = {}  # name -> class of a LayerInputs (one instance per pruning run)


def register_layer_inputs(name: str) -> Callable[[type], type]:
    """Class decorator adding a LayerInputs strategy under `name`; a name may be registered once."""

    def add(cls: type) -> type:
        if name in LAYER_INPUTS:
            raise ValueError(f"layer_inputs {name!r} is already registered by {LAYER_INPUTS[name].__qualname__}")
        LAYER_INPUTS[name] = cls
        return cls

    return add


def input_of(args: tuple, kwargs: dict) -> Tensor:
    """A layer's input, as its forward pre-hook sees it."""
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def pre_hooks(modules: set[nn.Module], hook: Callable) -> Iterator[None]:
    """Attach `hook` before each module's forward; always detach, even on error."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class SharedInputStatistics:
    """Forward pre-hook adding each pending layer's input to its statistic; a layer fed the very
    tensor the layer before it got shares that layer's statistic. A batch's forward ends
    (StopForward) once every pending layer has seen it: the rest of the block feeds none of them."""

    def __init__(self, pending: set[nn.Module], statistic: type[Statistic]) -> None:
        self.pending, self.statistic = pending, statistic
        self.stats: dict[nn.Module, Statistic] = {}  # insertion order = execution order
        self.start_batch()

    def start_batch(self) -> None:
        self.last: tuple[Tensor | None, Statistic | None] = (None, None)
        self.seen: set[nn.Module] = set()  # this batch's pending layers that saw their input

    def add(self, module: nn.Module, x: Tensor) -> None:
        last_input, last_stat = self.last
        if x is last_input:
            self.stats.setdefault(module, last_stat)
        else:
            stat = self.stats.setdefault(module, self.statistic(x.shape[-1]))
            stat.add_batch(x)
            self.last = (x, stat)
        self.seen.add(module)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module in self.pending:
            self.add(module, input_of(args, kwargs))
            if len(self.seen) == len(self.pending):
                raise StopForward

    def groups(self) -> list[tuple[Statistic, list[nn.Module]]]:
        """The layers seen, by shared statistic, in execution order."""
        groups: dict[int, tuple[Statistic, list[nn.Module]]] = {}
        for module, stat in self.stats.items():
            groups.setdefault(id(stat), (stat, []))[1].append(module)
        return list(groups.values())


def gather_statistics(work: BlockWork) -> list[tuple[Statistic, list[nn.Module]]]:
    """Every pending layer's statistic over all batches of the dense block, grouped by shared input."""
    collect = SharedInputStatistics(work.pending, work.pruner.statistic)
    with pre_hooks(work.pending, collect):
        for forward in work.forwards:
            collect.start_batch()
            with stopping(), work.precision():
                forward()
    return collect.groups()


@register_layer_inputs("dense")
class DenseInputs:
    """The reference: statistics from the dense block, every layer pruned, then the pruned block's outputs."""

    def __call__(self, work: BlockWork) -> list[Tensor] | None:
        for stat, modules in gather_statistics(work):
            work.pruner.prune_group(modules, stat)
            work.pending.difference_update(modules)
        return [forward() for forward in work.forwards] if work.want_outputs else None
