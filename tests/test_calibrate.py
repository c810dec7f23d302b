"""The reference 'dense' layer-inputs strategy and the registry of strategies, on tiny hand-made blocks.

A recording pruner stands in for the solver: the thing under test is which statistics are
gathered from which forwards, and which layers are solved together.
"""

from contextlib import contextmanager

import pytest
import torch
from torch import nn

import sparsetorch.oneshot
from sparsetorch.oneshot.calibrate import (
    LAYER_INPUTS,
    BlockWork,
    DenseInputs,
    SharedInputStatistics,
    gather_statistics,
    register_layer_inputs,
)
from sparsetorch.oneshot.capture import StopForward
from sparsetorch.oneshot.stats import Gram, InputSqNorms


class RecordingPruner:
    """The LayerPruner protocol: records every prune_group call and zeroes the layers' weights."""

    def __init__(self, block: nn.Module, statistic=Gram) -> None:
        self.statistic = statistic
        self.names = {m: name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        self.calls: list[tuple[list[nn.Module], object]] = []

    def prune_group(self, modules, stat) -> None:
        self.calls.append((list(modules), stat))
        with torch.no_grad():
            for module in modules:
                module.weight.zero_()


class Attention(nn.Module):
    """q/k/v fed the very same tensor, then o; a tail after every linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.tail = nn.Identity()

    def forward(self, x):
        h = self.norm(x)
        mixed = (self.q(h) * self.k(h)).softmax(-1) * self.v(h)
        return self.tail(x + self.o(mixed))


class TwoCopies(nn.Module):
    """a and b fed equal values in different tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.a(x) + self.b(x.clone())


def _work(block, batches, pending=None, statistic=Gram, **options):
    pruner = RecordingPruner(block, statistic)
    pending = set(pruner.names) if pending is None else set(pending)
    forwards = [lambda x=x: block(x) for x in batches]
    return BlockWork(pending, forwards, pruner, **options), pruner


def _batches(count=3, tokens=5):
    return [torch.randn(2, tokens, 8) for _ in range(count)]


def _inputs_of(modules, block, batches):
    """Each module's inputs over all batches, captured by plain hooks on the dense block."""
    seen = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda m, args: seen[m].append(args[0])) for m in modules]
    with torch.no_grad():
        for x in batches:
            block(x)
    for handle in handles:
        handle.remove()
    return {m: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for m, xs in seen.items()}


def test_layers_fed_the_same_tensor_share_one_statistic_and_are_pruned_together():
    block = Attention()
    work, pruner = _work(block, _batches())
    DenseInputs()(work)
    assert [modules for modules, _ in pruner.calls] == [[block.q, block.k, block.v], [block.o]]
    assert pruner.calls[0][1] is not pruner.calls[1][1]


def test_layers_fed_equal_values_in_different_tensors_do_not_share():
    block = TwoCopies()
    work, pruner = _work(block, _batches())
    DenseInputs()(work)
    assert [modules for modules, _ in pruner.calls] == [[block.a], [block.b]]
    a_stat, b_stat = pruner.calls[0][1], pruner.calls[1][1]
    assert a_stat is not b_stat
    assert torch.equal(a_stat.value, b_stat.value)  # equal inputs, each counted once in its own statistic


@pytest.mark.parametrize("statistic", [Gram, InputSqNorms])
def test_statistics_equal_those_of_the_layer_inputs_over_all_batches(statistic):
    block, batches = Attention(), _batches(count=3)
    inputs = _inputs_of([block.q, block.o], block, batches)
    work, _ = _work(block, batches, statistic=statistic)
    groups = gather_statistics(work)
    for (stat, modules), first in zip(groups, [block.q, block.o], strict=True):
        assert modules[0] is first
        expected = statistic(8)
        expected.add_batch(inputs[first])
        assert stat.tokens == inputs[first].shape[0] == 3 * 2 * 5  # shared: added once per batch, not per layer
        torch.testing.assert_close(stat.value, expected.value, rtol=1e-5, atol=1e-5)


def test_a_batch_forward_stops_once_every_pending_layer_has_been_seen():
    block = Attention()
    runs = {"o": 0, "tail": 0}
    block.o.register_forward_hook(lambda *args: runs.__setitem__("o", runs["o"] + 1))
    block.tail.register_forward_hook(lambda *args: runs.__setitem__("tail", runs["tail"] + 1))

    work, _ = _work(block, _batches(count=3))
    gather_statistics(work)
    assert runs == {"o": 0, "tail": 0}  # o's pre-hook is the last pending one: neither o nor the tail runs

    work, _ = _work(block, _batches(count=3), pending=[block.q, block.k, block.v])
    groups = gather_statistics(work)
    assert runs == {"o": 0, "tail": 0}  # stopped at v: o never ran
    assert [modules for _, modules in groups] == [[block.q, block.k, block.v]]


def test_dense_inputs_empties_pending_and_returns_the_pruned_blocks_outputs():
    block, batches = Attention(), _batches(count=2)
    dense = [block(x) for x in batches]
    work, _ = _work(block, batches)
    outputs = DenseInputs()(work)
    assert work.pending == set()
    assert len(outputs) == 2
    for x, out, before in zip(batches, outputs, dense):
        torch.testing.assert_close(out, block(x))  # the block as pruned (weights zeroed) ...
        assert not torch.allclose(out, before)  # ... not as it was


def test_no_outputs_and_no_output_forwards_unless_wanted():
    block = Attention()
    runs = []
    block.norm.register_forward_hook(lambda *args: runs.append(1))
    work, _ = _work(block, _batches(count=3), want_outputs=False)
    assert DenseInputs()(work) is None
    assert work.pending == set()
    assert len(runs) == 3  # the statistics forwards only


def test_the_precision_context_wraps_the_statistics_forwards_only():
    block, batches = Attention(), _batches(count=2)
    inside = []
    entered = []

    @contextmanager
    def precision():
        inside.append(True)
        entered.append(1)
        try:
            yield
        finally:
            inside.pop()

    ran_inside = []

    def forward(x):
        ran_inside.append(bool(inside))
        return block(x)

    work, _ = _work(block, batches, precision=precision)
    work.forwards = [lambda x=x: forward(x) for x in batches]
    DenseInputs()(work)
    assert ran_inside == [True, True, False, False]  # 2 statistics forwards, then 2 output forwards
    assert len(entered) == 2


def test_hooks_are_removed_even_when_a_forward_raises():
    block = Attention()
    work, _ = _work(block, _batches(count=1))

    def broken():
        raise RuntimeError("boom")

    work.forwards = [broken]
    with pytest.raises(RuntimeError, match="boom"):
        DenseInputs()(work)
    assert all(not m._forward_pre_hooks for m in block.modules())


def test_shared_input_statistics_groups_in_execution_order():
    a, b, c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    collect = SharedInputStatistics({a, b, c}, InputSqNorms)
    x, y = torch.ones(2, 3), torch.full((2, 3), 2.0)
    collect(c, (y,), {})
    collect(a, (), {"input": x})  # an input passed by keyword
    with pytest.raises(StopForward):
        collect(b, (x,), {})
    (c_stat, c_group), (a_stat, a_group) = collect.groups()
    assert (c_group, a_group) == ([c], [a, b])
    assert c_stat.value.tolist() == [8.0] * 3 and a_stat.value.tolist() == [2.0] * 3


def test_registering_a_name_twice_raises_naming_the_existing_class():
    class Another:
        pass

    with pytest.raises(ValueError, match=r"'dense' is already registered by DenseInputs"):
        register_layer_inputs("dense")(Another)
    assert LAYER_INPUTS["dense"] is DenseInputs
    try:
        assert register_layer_inputs("test-another")(Another) is Another
        assert LAYER_INPUTS["test-another"] is Another
        with pytest.raises(ValueError, match="already registered by .*Another"):
            register_layer_inputs("test-another")(DenseInputs)
    finally:
        LAYER_INPUTS.pop("test-another", None)


def test_importing_oneshot_registers_the_three_strategies():
    assert {"dense", "mixed", "pruned"} <= set(sparsetorch.oneshot.LAYER_INPUTS)
    assert sparsetorch.oneshot.LAYER_INPUTS["dense"] is DenseInputs
    assert sparsetorch.oneshot.LAYER_INPUTS["mixed"] is sparsetorch.oneshot.MixedInputs
    assert sparsetorch.oneshot.LAYER_INPUTS["pruned"] is sparsetorch.oneshot.PrunedInputs


class Reused(nn.Module):
    """a runs twice before b: a batch has seen every pending layer only once b has run."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


def test_a_layer_run_twice_in_a_block_does_not_end_the_statistics_forward_early():
    block = Reused()
    work, pruner = _work(block, _batches(count=2))
    with torch.no_grad():
        DenseInputs()(work)
    assert not work.pending
    assert {m for modules, _ in pruner.calls for m in modules} == {block.a, block.b}
