"""Calibrating and pruning the layers of one block: three ways to feed each layer.

`layer_inputs="dense"` (the Wanda and SparseGPT papers' way): one forward of the
still-dense block gathers every layer's statistic, all layers are pruned, and a second
forward of the pruned block produces the next block's inputs. Each layer is calibrated
on what the dense block computes from the (already pruned) previous blocks' output.

`layer_inputs="pruned"`: a single forward in which each layer is pruned just before it
runs, from the inputs the already-pruned layers before it produce. Each calibration
batch runs in its own greenlet; before a pending layer every batch adds its input to
the layer's statistic and pauses, and once all have paused the layer is pruned and they
resume. Half the forward work, but measured worse at 2:4 (benchmarks/RESULTS.md).

`layer_inputs="mixed"`: every layer as in 'dense' except the block's last layer group
(an MLP's down projection), which is calibrated as in 'pruned', inside the one forward
of the pruned block that produces the next block's inputs. The dense forward then stops
as soon as the input of the last-but-one group is seen, so it never computes the MLP's
expansion (half of a Llama block's matmul work): 1.25 block forwards instead of 1.75.
Where that group is, the first batch of the first block learns by running to the end;
later blocks with the same layers (`StopPoints`) stop there from their first batch on.

Layers fed the very same tensor (q/k/v, gate/up) share one statistic in every way.
Only the dense block's forwards may run in a lower precision (`statistics_precision`):
they make statistics only, while the forward that makes the next block's inputs always
runs in the model's dtype, so rounding never compounds from block to block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import greenlet
from torch import Tensor, nn

from sparsetorch.oneshot.capture import Stop
from sparsetorch.oneshot.stats import Statistic

__all__ = ["LAYER_INPUTS", "StopPoints", "calibrate_and_prune"]

LAYER_INPUTS: tuple[str, ...] = ("dense", "pruned", "mixed")


class LayerPruner(Protocol):
    statistic: type[Statistic]
    names: dict[nn.Module, str]

    def prune(self, module: nn.Module, stat: Statistic) -> None: ...

    def prune_group(self, modules: list[nn.Module], stat: Statistic) -> None: ...


class StopPoints:
    """What 'mixed' statistics forwards learned, per block layout.

    A layout is the names of a block's pending layers within the block ("mlp.up_proj",
    ...). Blocks with the same layout run their layers in the same order, so the groups
    of layers sharing an input that one block's statistics forward wanted (in execution
    order) are the next one's too: its forward can stop before the last group's first
    layer from its first batch on, and that group's other layers join it unseen.
    """

    def __init__(self) -> None:
        self._known: dict[frozenset[str], list[list[str]]] = {}

    def find(self, layout: dict[nn.Module, str]) -> list[list[nn.Module]] | None:
        groups = self._known.get(frozenset(layout.values()))
        if groups is None:
            return None
        module = {name: m for m, name in layout.items()}
        return [[module[name] for name in group] for group in groups]

    def learn(self, layout: dict[nn.Module, str], groups: list[list[nn.Module]]) -> None:
        if groups and all(m in layout for group in groups for m in group):
            self._known[frozenset(layout.values())] = [[layout[m] for m in group] for group in groups]


def calibrate_and_prune(
    layer_inputs: str,
    pending: set[nn.Module],
    forwards: list[Callable[[], Tensor]],
    pruner: LayerPruner,
    want_outputs: bool = True,
    statistics_precision: Callable[[], AbstractContextManager] = nullcontext,
    stops: StopPoints | None = None,
    layout: dict[nn.Module, str] | None = None,
) -> list[Tensor] | None:
    """Prune every layer in `pending` from calibration batches run by `forwards`.

    `statistics_precision` gives the context the dense block's forwards run in (bf16
    autocast, say); the pruned block's forward runs outside it. With `stops` and the
    block's `layout` (pending layer -> name within the block), 'mixed' reuses and
    records where its statistics forward stops.

    Returns:
        The outputs of the pruned block per batch (None if not wanted).

    Raises:
        RuntimeError: a pending layer never ran during calibration.
    """
    if layer_inputs == "pruned":
        outputs = _from_pruned_inputs(pending, forwards, pruner, want_outputs)
    elif layer_inputs == "mixed":
        plan = stops.find(layout) if stops is not None and layout else None
        groups = _prune_from_dense_block(pending, forwards, pruner, statistics_precision, skip_last=True, plan=plan)
        if stops is not None and layout:
            stops.learn(layout, groups)
        outputs = _from_pruned_inputs(pending, forwards, pruner, want_outputs)
    else:
        _prune_from_dense_block(pending, forwards, pruner, statistics_precision)
        outputs = [forward() for forward in forwards] if want_outputs else None
    if pending:
        names = sorted(pruner.names[m] for m in pending)
        raise RuntimeError(f"these target layers never ran during calibration and were not pruned: {names}")
    return outputs


def _hook_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def _pre_hooks(modules: set[nn.Module], hook: Callable) -> Iterator[None]:
    """Attach `hook` before each module's forward; always detach, even on error."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---- dense inputs: gather all, prune all, run again ------------------------------------


class _Collector:
    """Accumulates each pending layer's statistic over batches of a dense forward.

    The first batch runs until every pending layer has been seen, which shows the
    order of the layer groups. Later batches stop right after the first layer of the
    last group still wanted: the layers after it in the block need not run. With
    `skip_last` the block's last group is not wanted (its first-batch statistic is
    dropped): it is left to the pruned forward. With a `plan` (the wanted groups of a
    block of the same layout) every batch stops before the last group's first layer,
    and `groups` adds the layers it never reached to the statistic of their group.
    """

    def __init__(self, pending: set[nn.Module], statistic: type[Statistic], skip_last: bool = False,
                 plan: list[list[nn.Module]] | None = None) -> None:
        self.pending, self.statistic, self.plan = pending, statistic, plan
        self.skip_last = skip_last and plan is None
        self.stats: dict[nn.Module, Statistic] = {}  # insertion order = execution order
        self.last: tuple[Tensor | None, Statistic | None] = (None, None)
        self.seen = 0
        self.stop_after = plan[-1][0] if plan else None  # else known after the first batch

    def start_batch(self) -> None:
        self.last, self.seen = (None, None), 0

    def end_first_batch(self) -> bool:
        """Learn where later batches stop; False if no group is wanted from them."""
        if self.plan:
            return bool(self.stats)
        if self.skip_last and self.stats:
            last_stat = next(reversed(self.stats.values()))
            self.stats = {m: s for m, s in self.stats.items() if s is not last_stat}
        if not self.stats:
            return False
        last_stat = next(reversed(self.stats.values()))
        self.stop_after = next(m for m, s in self.stats.items() if s is last_stat)
        return True

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module not in self.pending:
            return
        x = _hook_input(args, kwargs)
        last_input, last_stat = self.last
        if x is last_input:  # same tensor as the layer before: share its statistic
            self.stats.setdefault(module, last_stat)
        else:
            stat = self.stats.setdefault(module, self.statistic(x.shape[-1]))
            stat.add_batch(x)
            self.last = (x, stat)
        self.seen += 1
        if self.seen == len(self.pending) or module is self.stop_after:
            raise Stop  # every wanted input is seen: the rest of the block is not needed

    def groups(self) -> list[tuple[Statistic, list[nn.Module]]]:
        """The wanted layers by shared statistic, in execution order; with a plan, layers
        the forwards stopped before join the group of the layer they share an input with."""
        groups: dict[int, tuple[Statistic, list[nn.Module]]] = {}
        for module, stat in self.stats.items():
            groups.setdefault(id(stat), (stat, []))[1].append(module)
        for members in self.plan or []:
            stat = self.stats.get(members[0])
            unseen = [m for m in members[1:] if m not in self.stats and m in self.pending]
            if stat is not None:
                groups[id(stat)][1].extend(unseen)
        return list(groups.values())


def _prune_from_dense_block(
    pending: set[nn.Module],
    forwards: list[Callable[[], Tensor]],
    pruner: LayerPruner,
    precision: Callable[[], AbstractContextManager],
    skip_last: bool = False,
    plan: list[list[nn.Module]] | None = None,
) -> list[list[nn.Module]]:
    """Gather statistics from forwards of the dense block, then prune the layers they cover.

    Returns those layers, grouped by shared input, in execution order.
    """
    collector = _Collector(pending, pruner.statistic, skip_last, plan)
    with _pre_hooks(set(pending), collector):
        for index, forward in enumerate(forwards):
            collector.start_batch()
            try:
                with precision():
                    forward()
            except Stop:
                pass
            if index == 0 and not collector.end_first_batch():
                break
    groups = collector.groups()
    for stat, modules in groups:  # layers sharing an input are solved together
        pruner.prune_group(modules, stat)
        pending.difference_update(modules)
    return [modules for _, modules in groups]


# ---- pruned inputs: one pass, batches in lockstep --------------------------------------


def _from_pruned_inputs(
    pending: set[nn.Module], forwards: list[Callable[[], Tensor]], pruner: LayerPruner, want_outputs: bool
) -> list[Tensor] | None:
    lockstep = _Lockstep(pending, pruner)
    with _pre_hooks(set(pending), lockstep.hook):
        outputs = lockstep.run(forwards)
    return outputs if want_outputs else None


@dataclass
class _Group:
    """Layers fed the very same tensor share one statistic."""

    stat: Statistic
    done: bool = False


class _Lockstep:
    """Runs one forward per batch, pausing all of them before each pending layer."""

    def __init__(self, pending: set[nn.Module], pruner: LayerPruner) -> None:
        self.pending, self.pruner = pending, pruner
        self.scheduler: greenlet.greenlet | None = None
        self.paused_at: dict[greenlet.greenlet, nn.Module] = {}
        self.last: dict[greenlet.greenlet, tuple[Tensor, _Group]] = {}
        self.groups: dict[nn.Module, _Group] = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module not in self.pending:
            return
        me = greenlet.getcurrent()
        x = _hook_input(args, kwargs)
        last_input, last_group = self.last.get(me, (None, None))
        if x is last_input and last_group.done:  # same input as a layer just pruned
            self._prune(module, last_group)
            return
        group = self.groups.setdefault(module, _Group(self.pruner.statistic(x.shape[-1])))
        group.stat.add_batch(x)
        self.last[me] = (x, group)
        self.paused_at[me] = module
        self.scheduler.switch()  # wait here until every batch has reached `module`

    def _prune(self, module: nn.Module, group: _Group) -> None:
        self.pruner.prune(module, group.stat)
        self.pending.discard(module)
        group.done = True

    def run(self, forwards: list[Callable[[], Tensor]]) -> list[Tensor]:
        self.scheduler = greenlet.getcurrent()
        workers = [greenlet.greenlet(forward) for forward in forwards]
        outputs: dict[greenlet.greenlet, Tensor] = {}
        while len(outputs) < len(workers):
            self.paused_at.clear()
            for worker in workers:
                if worker not in outputs:
                    result = worker.switch()
                    if worker.dead:
                        outputs[worker] = result
            stops = set(self.paused_at.values())
            if len(stops) > 1 or (stops and len(self.paused_at) + len(outputs) != len(workers)):
                raise RuntimeError("calibration batches took different paths through the block")
            if stops:
                module = stops.pop()
                self._prune(module, self.groups.pop(module))
        return [outputs[worker] for worker in workers]
