"""The sequential block pipeline: prune a model one decoder block at a time.

1. Capture what the model feeds block 0 (and the extra arguments every block gets)
   for all calibration windows, by standing a recorder in for each block.
2. For block i, gather each target layer's input statistic, prune it, and let the
   *pruned* layer produce the inputs of the layers after it. Layers that receive the
   very same input tensor (q/k/v, gate/up) share one statistic.
3. The pruned block's outputs are block i+1's inputs.

Step 2 is a single forward pass. The calibration windows run in small batches (small
tensors stay in cache: 4 windows per batch run a block ~30% faster than 64), each
batch in its own greenlet; before each target layer every batch adds its input to the
layer's statistic and pauses, and once all have paused the layer is pruned and they
resume. Peak memory is one block plus the calibration activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import greenlet
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsetorch.families import find_blocks, model_type
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.report import LayerReport, PruneReport
from sparsetorch.oneshot.resume import ResumeCheckpoint
from sparsetorch.oneshot.solvers import get_solver
from sparsetorch.oneshot.stats import Statistic
from sparsetorch.targets import find_targets, set_weight_matrix, weight_matrix

__all__ = ["prune"]


class _Stop(Exception):
    """Raised inside a forward pass once the inputs it was run for have been seen."""


def prune(
    model: nn.Module,
    calibration: Tensor | None = None,
    config: PruneConfig | None = None,
    *,
    progress: bool = True,
    checkpoint: ResumeCheckpoint | None = None,
    **options,
) -> PruneReport:
    """Prune `model` in place, one-shot, and report what was done.

    Args:
        model: a Hugging Face causal LM (blocks found from its family) or any module
            (give `targets`, and `blocks` if it has a list of repeated blocks).
        calibration: (windows, tokens) input ids for HF models, or a batch of inputs
            for any module; not needed by 'magnitude' and 'random'.
        config: a PruneConfig; or pass its fields as keyword options instead.
        progress: show a progress bar.
        checkpoint: save progress after every block there, and resume from it if it holds
            an earlier interrupted run of the same configuration and calibration data.

    Returns:
        PruneReport with per-layer sparsity, keep masks and timings.

    Raises:
        ValueError: bad options, calibration missing or malformed, a layer shape that
            does not fit the pattern, or a model family with no known block layout.

    Example:
        >>> report = prune(model, windows, method="sparsegpt", pattern="2:4")
        >>> report.sparsity
        0.5
    """
    if config is None:
        config = PruneConfig(**options)
    elif options:
        raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
    targets = find_targets(model, config.targets, config.ignore)
    _check_shapes(targets, config)
    pruner = _LayerPruner(config, targets)
    started = time.perf_counter()
    with torch.no_grad():
        if pruner.statistic is None:
            for module in tqdm(list(targets.values()), desc=config.method, disable=not progress):
                pruner.prune(module, None)
        else:
            _prune_with_calibration(model, _check_calibration(calibration), config, pruner, progress, checkpoint)
    return pruner.report(time.perf_counter() - started)


def _check_shapes(targets: dict[str, nn.Module], config: PruneConfig) -> None:
    """Fail before any weight changes if a layer cannot take the pattern."""
    pattern = config.pattern_obj
    for name, module in targets.items():
        try:
            pattern.check_shape(weight_matrix(module).shape)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}; leave it dense with ignore=[{name!r}]") from None


def _check_calibration(calibration: Tensor | None) -> Tensor:
    if calibration is None:
        raise ValueError("this method needs calibration data: pass calibration=(windows, tokens) input ids")
    if not isinstance(calibration, Tensor) or calibration.dim() < 2 or calibration.shape[0] < 1:
        shape = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a tensor of shape (windows, ...), got {shape}")
    return calibration


class _LayerPruner:
    """Applies the configured solver to one layer at a time and keeps the report."""

    def __init__(self, config: PruneConfig, targets: dict[str, nn.Module]) -> None:
        self.config = config
        self.solver = get_solver(config.method)
        self.statistic: type[Statistic] | None = self.solver.statistic
        self.pattern = config.pattern_obj
        self.names = {module: name for name, module in targets.items()}
        self.index = {module: i for i, module in enumerate(targets.values())}
        self.layers: dict[str, LayerReport] = {}
        self.masks: dict[str, Tensor] = {}

    def pending(self, within: nn.Module) -> set[nn.Module]:
        return {m for m in within.modules() if m in self.names and self.names[m] not in self.layers}

    def prune(self, module: nn.Module, stat: Statistic | None) -> None:
        name = self.names[module]
        started = time.perf_counter()
        options = replace(self.config.solver_options(), seed=self.config.seed + self.index[module])
        weight = weight_matrix(module)
        new_weight, keep = self.solver.solve(weight, stat, self.pattern, self.config.sparsity, options)
        set_weight_matrix(module, new_weight)
        self.masks[name] = keep
        zeros = weight.numel() - int(torch.count_nonzero(weight_matrix(module)))
        self.layers[name] = LayerReport(
            name=name,
            shape=tuple(weight.shape),
            target_sparsity=self.config.sparsity,
            sparsity=zeros / weight.numel(),
            seconds=time.perf_counter() - started,
        )

    def report(self, seconds: float) -> PruneReport:
        return PruneReport(config=self.config, layers=self.layers, masks=self.masks, seconds=seconds)


# ---- calibration-driven pruning -------------------------------------------------------


def _prune_with_calibration(
    model: nn.Module,
    calibration: Tensor,
    config: PruneConfig,
    pruner: _LayerPruner,
    progress: bool,
    checkpoint: ResumeCheckpoint | None,
) -> None:
    chunks = list(calibration.split(config.batch_size))
    blocks = find_blocks(model, config.blocks)
    if blocks is None:
        if config.targets is None:
            raise ValueError(
                f"sparsetorch knows no block layout for model type {model_type(model)!r}: pass "
                "blocks='path.to.layers' (CLI --blocks) naming its ModuleList of decoder blocks, or "
                "targets=[...] (CLI --targets 're:.*mlp.*') to prune chosen layers in one whole-model pass"
            )
        forwards = [_discard_output(_model_forward(model, chunk)) for chunk in chunks]
        _calibrate_and_prune(pruner.pending(model), forwards, pruner)
        return
    _check_all_inside(pruner, blocks)
    modules = dict(model.named_modules())
    start, saved = (0, None) if checkpoint is None else checkpoint.restore(modules, pruner.layers, pruner.masks)
    hidden, calls = _capture_block_calls(model, blocks, chunks)
    hidden = hidden if saved is None else saved
    bar = tqdm(total=len(blocks), initial=start, desc=f"{config.method} {config.pattern}", disable=not progress)
    for index in range(start, len(blocks)):
        pending = pruner.pending(blocks[index])
        names = [pruner.names[m] for m in pending]
        forwards = [_block_forward(blocks[index], h, call) for h, call in zip(hidden, calls[index])]
        hidden = _calibrate_and_prune(pending, forwards, pruner)
        if checkpoint is not None:
            checkpoint.save(index, names, modules, pruner.layers, pruner.masks, hidden)
        bar.update()
    bar.close()


def _check_all_inside(pruner: _LayerPruner, blocks: nn.ModuleList) -> None:
    inside = {m for block in blocks for m in block.modules()}
    outside = [name for module, name in pruner.names.items() if module not in inside]
    if outside:
        raise ValueError(
            f"layers outside the decoder blocks cannot be calibrated block by block: {outside}; "
            f"keep them dense with ignore={outside} or prune them with method='magnitude'"
        )


def _model_forward(model: nn.Module, inputs: Tensor) -> Callable[[], Tensor]:
    if hasattr(model, "config") and not inputs.is_floating_point():
        return lambda: model(input_ids=inputs, use_cache=False)
    return lambda: model(inputs)


def _discard_output(forward: Callable[[], object]) -> Callable[[], None]:
    """Whole-model calibration needs the layer inputs only; logits would waste memory."""

    def run() -> None:
        forward()

    return run


@dataclass
class _BlockCall:
    """The non-hidden arguments a model passed to one block for one calibration batch."""

    args: tuple
    kwargs: dict


def _block_forward(block: nn.Module, hidden: Tensor, call: _BlockCall) -> Callable[[], Tensor]:
    def run() -> Tensor:
        out = block(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


class _Recorder(nn.Module):
    """Stands in for block `index`: records its inputs and passes the hidden state on."""

    def __init__(self, index: int, last: int, hidden: list[Tensor], calls: list[list[_BlockCall]]) -> None:
        super().__init__()
        self.index, self.last, self.hidden, self.calls = index, last, hidden, calls

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.hidden.append(hidden)
        self.calls[self.index].append(_BlockCall(args[1:], kwargs))
        if self.index == self.last:
            raise _Stop
        return hidden


def _capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, chunks: list[Tensor]
) -> tuple[list[Tensor], list[list[_BlockCall]]]:
    """Block 0's inputs per batch, and every block's extra arguments per batch.

    Each block gets its own arguments because families such as Gemma-2 give
    sliding-window and full-attention blocks different masks.
    """
    originals = list(blocks)
    hidden: list[Tensor] = []
    calls: list[list[_BlockCall]] = [[] for _ in originals]
    try:
        for i in range(len(originals)):
            blocks[i] = _Recorder(i, len(originals) - 1, hidden, calls)
        for chunk in chunks:
            try:
                _model_forward(model, chunk)()
            except _Stop:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return hidden, calls


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


def _calibrate_and_prune(
    pending: set[nn.Module], forwards: list[Callable[[], Tensor]], pruner: _LayerPruner
) -> list[Tensor]:
    """Prune every pending layer from the inputs the already-pruned ones produce.

    Each calibration batch runs its forward in its own greenlet. Before a pending layer,
    a batch adds its input to the layer's statistic and pauses; once every batch has
    paused there, the layer is pruned and all resume. So the block runs once, on small
    cache-friendly batches, yet every layer sees all calibration data.
    """
    lockstep = _Lockstep(pending, pruner)
    with _pre_hooks(set(pending), lockstep.hook):
        outputs = lockstep.run(forwards)
    if pending:
        names = sorted(pruner.names[m] for m in pending)
        raise RuntimeError(f"these target layers never ran during calibration and were not pruned: {names}")
    return outputs


@dataclass
class _Group:
    """Layers fed the very same tensor (q/k/v, gate/up) share one statistic."""

    stat: Statistic
    done: bool = False


class _Lockstep:
    """Runs one forward per batch, pausing all of them before each pending layer."""

    def __init__(self, pending: set[nn.Module], pruner: _LayerPruner) -> None:
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
