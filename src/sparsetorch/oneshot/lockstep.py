"""Faster orders of a block's calibration: 'pruned' and 'mixed' layer inputs (opt-in).

`layer_inputs="pruned"`: a single forward in which each layer is pruned just before it runs,
from the inputs the already-pruned layers before it produce. Each calibration batch runs in its
own greenlet; before a pending layer every batch adds its input to the layer's statistic and
pauses, and once all have paused the layer is pruned and they resume. Half the forward work of
the reference, but each layer is calibrated on other inputs than the papers' (what that costs is
in benchmarks/RESULTS.md).

`layer_inputs="mixed"`: every layer as in the reference ('dense') except the block's last layer
group (an MLP's down projection), which is calibrated as in 'pruned', inside the one forward of
the pruned block that produces the next block's inputs. The dense forward then stops as soon as
the input of the last-but-one group is seen, so it never computes the MLP's expansion: 1.25 block
forwards instead of 1.75. Where that group is, the first batch of the first block learns by
running to the end; later blocks with the same layers (`StopPoints`) stop there from their first
batch on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import greenlet
from torch import Tensor, nn

from sparsetorch.oneshot.calibrate import (
    BlockWork,
    LayerPruner,
    SharedInputStatistics,
    input_of,
    pre_hooks,
    register_layer_inputs,
)
from sparsetorch.oneshot.capture import StopForward, stopping
from sparsetorch.oneshot.stats import Statistic

__all__ = ["MixedInputs", "PrunedInputs", "StopPoints"]


@register_layer_inputs("pruned")
class PrunedInputs:
    """One forward per batch in lockstep, each layer pruned from the pruned layers' outputs before it."""

    def __call__(self, work: BlockWork) -> list[Tensor] | None:
        lockstep = _Lockstep(work.pending, work.pruner)
        with pre_hooks(set(work.pending), lockstep.hook):
            outputs = lockstep.run(work.forwards)
        return outputs if work.want_outputs else None


@register_layer_inputs("mixed")
class MixedInputs:
    """The reference's statistics for all but the block's last layer group, which is pruned in lockstep."""

    def __init__(self) -> None:
        self.stops = StopPoints()  # what one block's statistics forward learned, for the blocks like it

    def __call__(self, work: BlockWork) -> list[Tensor] | None:
        plan = self.stops.find(work.layout) if work.layout else None
        groups = _prune_all_but_last(work, plan)
        if work.layout:
            self.stops.learn(work.layout, groups)
        return PrunedInputs()(work)


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


class _AllButLast(SharedInputStatistics):
    """The statistics of every layer group but the block's last, over a dense forward.

    The first batch runs until every pending layer has been seen, which shows the order of the
    layer groups; the last group's statistic is then dropped, and later batches stop right after
    the first layer of the last group still wanted. With a `plan` (the wanted groups of a block
    of the same layout) every batch stops there, and `groups` adds the layers it never reached to
    the statistic of their group.
    """

    def __init__(self, pending: set[nn.Module], statistic: type[Statistic], plan: list[list[nn.Module]] | None) -> None:
        super().__init__(pending, statistic)
        self.plan = plan
        self.stop_after = plan[-1][0] if plan else None  # else known after the first batch

    def end_first_batch(self) -> bool:
        """Learn where later batches stop; False if no group is wanted from them."""
        if self.plan:
            return bool(self.stats)
        if self.stats:
            last_stat = next(reversed(self.stats.values()))
            self.stats = {m: s for m, s in self.stats.items() if s is not last_stat}
        if not self.stats:
            return False
        last_stat = next(reversed(self.stats.values()))
        self.stop_after = next(m for m, s in self.stats.items() if s is last_stat)
        return True

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module in self.pending:
            self.add(module, input_of(args, kwargs))
            if len(self.seen) == len(self.pending) or module is self.stop_after:
                raise StopForward

    def groups(self) -> list[tuple[Statistic, list[nn.Module]]]:
        groups = super().groups()
        by_stat = {id(stat): modules for stat, modules in groups}
        for members in self.plan or []:
            stat = self.stats.get(members[0])
            if stat is not None:
                by_stat[id(stat)].extend(m for m in members[1:] if m not in self.stats and m in self.pending)
        return groups


def _prune_all_but_last(work: BlockWork, plan: list[list[nn.Module]] | None) -> list[list[nn.Module]]:
    """Prune every layer group but the last from the dense block's statistics; return those groups."""
    collect = _AllButLast(work.pending, work.pruner.statistic, plan)
    with pre_hooks(set(work.pending), collect):
        for index, forward in enumerate(work.forwards):
            collect.start_batch()
            with stopping(), work.precision():
                forward()
            if index == 0 and not collect.end_first_batch():
                break
    groups = collect.groups()
    for stat, modules in groups:
        work.pruner.prune_group(modules, stat)
        work.pending.difference_update(modules)
    return [modules for _, modules in groups]


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
        x = input_of(args, kwargs)
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
        self.pruner.prune_group([module], group.stat)
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
