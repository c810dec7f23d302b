"""The sequential block pipeline: prune a model one decoder block at a time.

1. Capture what the model feeds block 0 for all calibration windows (`capture.py`), running
   sparsetorch's own model for the families it implements and transformers' blocks otherwise.
2. For block i, gather each target layer's input statistic and prune it (`calibrate.py`: by
   default from the dense block's activations, as the papers do).
3. The pruned block's outputs are block i+1's inputs.

With `quantize`, each layer's weights end on a value grid as the last step of its pruning, and
the embeddings after the last block (`quantized.py` gives the order).

Calibration windows run in small batches, which keep a block's tensors in cache. Beyond the model
itself, peak memory is one block's work plus the calibration activations. With a `BlockStore`
(`oneshot/streaming.py`) the model is not held either: its blocks stay on the meta device, and the
store reads each block's weights before its turn and writes and frees them after.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sparsetorch import allocate
from sparsetorch.families import find_blocks, model_type
from sparsetorch.oneshot.calibrate import LAYER_INPUTS, BlockWork
from sparsetorch.oneshot.capture import BlockBatches, block_batches, calibration_model, model_forward
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.masks import PackedMasks
from sparsetorch.oneshot.outliers import block_outlier_ratios
from sparsetorch.oneshot.quantized import quantization_record, quantize_embeddings, round_layer
from sparsetorch.oneshot.reconstruct import BlockFit, reconstruct_block, refit_layer
from sparsetorch.oneshot.refine import dsnot
from sparsetorch.oneshot.report import LayerReport, PruneReport
from sparsetorch.oneshot.resume import ResumeCheckpoint
from sparsetorch.oneshot.solvers import get_solver
from sparsetorch.oneshot.stats import Statistic
from sparsetorch.precision import calibration_precision, full_precision
from sparsetorch.quantize import QuantGrid
from sparsetorch.targets import find_targets, is_conv1d, set_weight_matrix, weight_matrix

__all__ = ["BlockStore", "prune"]


class BlockStore(Protocol):
    """Where the decoder blocks' weights live when the model is not held whole (`oneshot/streaming.py`).

    The pipeline calls `load` before it works on block `index` and `release` once the block is pruned
    and checkpointed; on resume, `resume` replaces loading the finished blocks into the model. A pass
    that only measures the blocks (OWL's) frees each with `unload`, which writes nothing. The weights
    outside the blocks are loaded (`load_outside`) only to make block 0's inputs, then freed
    (`unload_outside`), and loaded again for the run's last step.
    """

    def load_outside(self) -> None: ...

    def unload_outside(self) -> None: ...

    def resume(self, checkpoint: ResumeCheckpoint, pruner: _LayerPruner) -> tuple[int, list[Tensor] | None]: ...

    def load(self, index: int, block: nn.Module) -> None: ...

    def release(self, index: int, block: nn.Module, pruner: _LayerPruner) -> None: ...

    def unload(self, index: int, block: nn.Module) -> None: ...


def prune(
    model: nn.Module,
    calibration: Tensor | None = None,
    config: PruneConfig | None = None,
    *,
    progress: bool = True,
    checkpoint: ResumeCheckpoint | None = None,
    store: BlockStore | None = None,
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
        store: where the blocks' weights are read from and written to, for a model whose blocks are
            on the meta device (`sparsetorch.oneshot.streaming.prune_directory` builds one); the
            report then holds no keep masks (the store wrote the weights they are read from).

    Returns:
        PruneReport with per-layer sparsity, keep masks and timings (and with `quantize`, the
        value grid of every quantized module).

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
    _check_quantizable(targets, config)
    started = time.perf_counter()
    with torch.no_grad():
        if not config.calibrated:
            pruner = _LayerPruner(config, targets)
            blocks = find_blocks(model, config.blocks)
            pruner.sparsity = _allocate(config, pruner, blocks, None)
            _prune_uncalibrated(pruner, blocks, progress, store, checkpoint)
        else:
            calibration = _check_calibration(calibration, model)
            runner, targets = calibration_model(model, targets, calibration.shape[-1], config.blocks)
            pruner = _LayerPruner(config, targets)
            _prune_with_calibration(runner, calibration, config, pruner, progress, checkpoint, store)
        if store is not None:
            store.load_outside()
        pruner.quantize_embeddings(model)
    return pruner.report(time.perf_counter() - started)


def _check_shapes(targets: dict[str, nn.Module], config: PruneConfig) -> None:
    """Fail before any weight changes if a layer cannot take the pattern, naming every such layer."""
    pattern = config.pattern_obj
    errors = {}
    for name, module in targets.items():
        try:
            pattern.check_shape(weight_matrix(module).shape)
        except ValueError as err:
            errors[name] = str(err)
    if errors:
        first, reason = next(iter(errors.items()))
        raise ValueError(f"layer {first}: {reason}; {len(errors)} layer(s) cannot take {config.pattern}: leave them "
                         f"dense with ignore={list(errors)}")


def _check_quantizable(targets: dict[str, nn.Module], config: PruneConfig) -> None:
    """Quantized weights must be exactly on their grids, which only float32 holds (an int4 code times an
    fp16 scale needs up to 15 significant bits; bfloat16 has 8)."""
    if config.quantize is None:
        return
    for name, module in targets.items():
        if module.weight.dtype != torch.float32:
            raise ValueError(f"quantize={config.quantize!r} needs float32 weights to hold grid values exactly; "
                             f"{name} is {module.weight.dtype}: load the model with dtype=torch.float32 (the "
                             "stored form is integer codes either way)")


def _check_calibration(calibration: Tensor | None, model: nn.Module) -> Tensor:
    """Calibration a model can run: for a language model (one whose config has a vocab_size), integer
    token ids inside its vocabulary, at least 2 per window; for any other module, a batch of inputs."""
    if calibration is None:
        raise ValueError("this method needs calibration data: pass calibration=(windows, tokens) input ids")
    if not isinstance(calibration, Tensor) or calibration.dim() < 2 or calibration.shape[0] < 1:
        shape = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a tensor of shape (windows, ...), got {shape}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        return calibration
    if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
        raise TypeError(f"calibration of a language model must be token ids (an integer tensor), got {calibration.dtype}")
    if calibration.dim() != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be (windows, tokens) ids with at least 2 tokens per window, "
                         f"got shape {tuple(calibration.shape)}")
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"calibration holds token id {bad}, outside the model's vocabulary of {vocab} ids (0..{vocab - 1})")
    return calibration


class _LayerPruner:
    """Applies the configured solver to one layer at a time and keeps the report."""

    def __init__(self, config: PruneConfig, targets: dict[str, nn.Module]) -> None:
        self.config = config
        self.solver = get_solver(config.method)
        self.statistic: type[Statistic] | None = config.statistic
        self.pattern = config.pattern_obj
        self.names = {module: name for name, module in targets.items()}
        self.index = {module: i for i, module in enumerate(targets.values())}
        self.layers: dict[str, LayerReport] = {}
        self.masks: PackedMasks = PackedMasks()  # a byte per weight as bools would outweigh the model
        self.sparsity: dict[str, float] = {name: config.sparsity for name in targets}  # see `_allocate`
        self.block_fits: dict[int, BlockFit] = {}
        self.scheme = config.scheme
        self.grids: dict[str, QuantGrid] = {}
        self.embeddings: list[str] = []

    def pending(self, within: nn.Module) -> set[nn.Module]:
        return {m for m in within.modules() if m in self.names and self.names[m] not in self.layers}

    def prune_group(self, modules: list[nn.Module], stat: Statistic | None) -> None:
        """Prune layers that share one input (and so one statistic) together."""
        started = time.perf_counter()
        options = replace(self.config.solver_options(), seed=self.config.seed + self.index[modules[0]])
        weights = [weight_matrix(module) for module in modules]
        sparsity = self.sparsity[self.names[modules[0]]]  # layers sharing an input sit in one block
        with full_precision(weights[0].device):  # even inside a caller's autocast context
            results = self.solver.solve(weights, stat, self.pattern, sparsity, options)
            results = [self._improve(dense, result, stat) for dense, result in zip(weights, results)]
        seconds = (time.perf_counter() - started) / len(modules)
        for module, weight, (new_weight, keep, grid) in zip(modules, weights, results):
            set_weight_matrix(module, new_weight)
            name = self.names[module]
            self.masks[name] = keep
            if grid is not None:
                self.grids[name] = grid
            zeros = weight.numel() - int(torch.count_nonzero(new_weight))
            self.layers[name] = LayerReport(
                name=name,
                shape=tuple(weight.shape),
                target_sparsity=sparsity,
                sparsity=zeros / weight.numel(),
                seconds=seconds,
            )

    def _improve(self, dense: Tensor, result: tuple[Tensor, ...], stat: Statistic | None
                 ) -> tuple[Tensor, Tensor, QuantGrid | None]:
        """The steps after the method: refine the mask, refit the kept weights (see PruneConfig), then
        with `quantize` round them to nearest, unless the method's own grid still holds them."""
        weight, keep, grid = (*result, None) if len(result) == 2 else result
        solved = weight
        if self.config.refine == "dsnot":
            weight, keep = dsnot(dense.float(), weight.float(), keep, stat, self.pattern)
        if self.config.reconstruct is not None:
            weight = refit_layer(dense.float(), weight.float(), keep, stat.value, dampening=self.config.dampening)
        if self.scheme is not None and (grid is None or not (weight is solved or torch.equal(weight, solved))):
            weight, grid = round_layer(weight, keep, self.scheme)
        return weight, keep, grid

    def round_block(self, block: nn.Module) -> None:
        """Round the pruned layers of `block` to nearest on grids of their final weights (after a block fit)."""
        for module in block.modules():
            name = self.names.get(module)
            if name in self.masks:
                weight, self.grids[name] = round_layer(weight_matrix(module), self.masks[name], self.scheme)
                set_weight_matrix(module, weight)

    def fit_block(self, block: nn.Module, forwards: list, targets: list[Tensor], outputs: list[Tensor] | None
                  ) -> BlockFit:
        """Block reconstruction (`reconstruct_block`), the trained weights rounded back onto grids when
        quantizing; the grids go back too where the fit put the starting weights back."""
        layers = {self.names[m]: m for m in block.modules() if self.names.get(m) in self.masks}
        saved = {name: self.grids[name] for name in layers if name in self.grids}
        project = None if self.scheme is None else partial(self.round_block, block)
        fit = reconstruct_block(block, self.block_masks(block), forwards, targets, outputs=outputs, project=project)
        if not fit.loss_after < fit.loss_before:  # reconstruct_block restored the start
            self.grids.update(saved)
        elif project is not None:  # kept weights rounded to 0 by the last rounding count as zeros
            for name, module in layers.items():
                weight = weight_matrix(module)
                zeros = weight.numel() - int(torch.count_nonzero(weight))
                self.layers[name] = replace(self.layers[name], sparsity=zeros / weight.numel())
        return fit

    def quantize_embeddings(self, model: nn.Module) -> None:
        """The last step of a quantizing run: the embeddings to int8 per row (`PruneConfig.quantize_embeddings`)."""
        if self.scheme is None or not self.config.quantize_embeddings:
            return
        grids = quantize_embeddings(model, skip=set(self.names.values()))
        self.grids.update(grids)
        self.embeddings = list(grids)

    def block_masks(self, block: nn.Module) -> dict[nn.Module, Tensor]:
        """The keep mask of each pruned layer of `block`, shaped like its `weight`."""
        masks = {}
        for module in block.modules():
            keep = self.masks.get(self.names.get(module))
            if keep is not None:
                masks[module] = keep.t() if is_conv1d(module) else keep
        return masks

    def report(self, seconds: float) -> PruneReport:
        quantization = None if self.scheme is None else quantization_record(self.config, self.embeddings)
        return PruneReport(config=self.config, layers=self.layers, masks=self.masks, seconds=seconds,
                           blocks=self.block_fits, grids=self.grids, quantization=quantization)


def _prune_uncalibrated(pruner: _LayerPruner, blocks: nn.ModuleList | None, progress: bool,
                        store: BlockStore | None, checkpoint: ResumeCheckpoint | None) -> None:
    """Methods without calibration: every target on its own; block by block when a store holds the blocks."""
    modules = list(pruner.names)
    bar = tqdm(total=len(modules), desc=pruner.config.method, disable=not progress)
    if store is not None:
        _prune_stored_blocks(pruner, blocks, store, checkpoint, bar)
    for module in modules:  # all of them in memory; with a store, those outside the blocks
        if pruner.names[module] not in pruner.layers:
            pruner.prune_group([module], None)
            bar.update()
    bar.close()


def _prune_stored_blocks(pruner: _LayerPruner, blocks: nn.ModuleList, store: BlockStore,
                         checkpoint: ResumeCheckpoint | None, bar: tqdm) -> None:
    """Each block's targets, the block loaded from and released to `store`, and checkpointed after it."""
    start = 0 if checkpoint is None else store.resume(checkpoint, pruner)[0]
    bar.update(len(pruner.layers))
    named = {name: module for module, name in pruner.names.items()}
    for index in range(start, len(blocks)):
        store.load(index, blocks[index])
        names = [pruner.names[m] for m in blocks[index].modules() if m in pruner.names]
        for name in names:
            pruner.prune_group([named[name]], None)
            bar.update()
        if checkpoint is not None:
            checkpoint.save(index, names, named, pruner.layers, pruner.masks, [], pruner.grids)
        store.release(index, blocks[index], pruner)


# ---- calibration-driven pruning -------------------------------------------------------


def _prune_with_calibration(
    model: nn.Module,
    calibration: Tensor,
    config: PruneConfig,
    pruner: _LayerPruner,
    progress: bool,
    checkpoint: ResumeCheckpoint | None,
    store: BlockStore | None = None,
) -> None:
    chunks = list(calibration.split(config.batch_size))
    strategy = LAYER_INPUTS[config.layer_inputs]()
    precision = partial(calibration_precision, model, config.calib_dtype)  # statistics forwards only
    blocks = find_blocks(model, config.blocks)
    if blocks is None:
        _prune_whole_model(model, chunks, config, pruner, strategy, precision)
        return
    _check_all_inside(pruner, blocks)
    if store is not None:
        store.load_outside()
    batches = block_batches(model, blocks, chunks)
    if store is not None:
        store.unload_outside()
    pruner.sparsity = _allocate(config, pruner, blocks, batches, store, checkpoint)  # before a resume restores
    modules = dict(model.named_modules())
    if checkpoint is None:
        start, saved = 0, None
    elif store is None:
        start, saved = checkpoint.restore(modules, pruner.layers, pruner.masks, pruner.grids)
    else:
        start, saved = store.resume(checkpoint, pruner)
    hidden = batches.hidden if saved is None else saved
    bar = tqdm(total=len(blocks), initial=start, desc=f"{config.method} {config.pattern}", disable=not progress,
               mininterval=0)  # every block shows: there are few, and each is a moment an interrupt may come
    fit_blocks = config.reconstruct == "block"
    for index in range(start, len(blocks)):
        block = blocks[index]
        if store is not None:
            store.load(index, block)
        pending = pruner.pending(block)
        names = [pruner.names[m] for m in pending]
        forwards = batches.forwards(block, hidden)
        targets = [forward() for forward in forwards] if fit_blocks else None  # the dense block's outputs
        wanted = index < len(blocks) - 1
        work = BlockWork(pending, forwards, pruner, want_outputs=wanted and not fit_blocks, precision=precision,
                         layout={m: name for name, m in block.named_modules() if m in pending})
        hidden = strategy(work)
        _check_all_pruned(pruner, work.pending)
        if fit_blocks:
            hidden = [] if wanted else None  # filled with the fitted block's outputs
            with torch.enable_grad():
                pruner.block_fits[index] = pruner.fit_block(block, forwards, targets, hidden)
        if checkpoint is not None:
            checkpoint.save(index, names, modules, pruner.layers, pruner.masks, hidden, pruner.grids)
        if store is not None:
            store.release(index, block, pruner)
        bar.update()
    bar.close()


def _allocate(config: PruneConfig, pruner: _LayerPruner, blocks: nn.ModuleList | None,
              batches: BlockBatches | None, store: BlockStore | None = None,
              checkpoint: ResumeCheckpoint | None = None) -> dict[str, float]:
    """Each target layer's sparsity: its block's, by `config.allocation`, then `config.layer_sparsity`.
    Without blocks (a whole-model pass) only 'uniform' and the explicit map apply. OWL's block
    sparsities are kept in `checkpoint`, so a resumed run does not measure (or read) the blocks again."""
    if blocks is None:
        if config.allocation != "uniform":
            raise ValueError(f"allocation={config.allocation!r} spreads sparsity over decoder blocks, and sparsetorch "
                             f"knows none for this model: pass blocks='path.to.layers'")
        blocks = nn.ModuleList()
    if config.allocation == "owl":
        if batches is None:
            raise ValueError("allocation='owl' measures outliers on calibration data: use a calibrated method "
                             "(wanda, sparsegpt) or another allocation")
        per_block = None if checkpoint is None else checkpoint.block_sparsities()
        if per_block is None:
            ratios = block_outlier_ratios(batches, blocks, set(pruner.names), config.owl_m, store)
            per_block = allocate.owl(ratios, config.sparsity, config.owl_lambda)
            if checkpoint is not None:
                checkpoint.save_block_sparsities(per_block)
    elif config.allocation == "depth":
        per_block = allocate.depth(len(blocks), config.sparsity, config.depth_step)
    else:
        per_block = allocate.uniform(len(blocks), config.sparsity)
    allocate.check_spread(per_block, f"allocation={config.allocation!r}")
    sparsity = dict(pruner.sparsity)
    for block, block_sparsity in zip(blocks, per_block):
        sparsity.update({pruner.names[m]: block_sparsity for m in block.modules() if m in pruner.names})
    unknown = set(config.layer_sparsity or {}) - set(sparsity)
    if unknown:
        raise ValueError(f"layer_sparsity names layers that are not pruned: {sorted(unknown)}")
    sparsity.update(config.layer_sparsity or {})
    return sparsity


def _prune_whole_model(model: nn.Module, chunks: list[Tensor], config: PruneConfig, pruner: _LayerPruner,
                       strategy, precision) -> None:
    """Models with no known list of blocks: chosen targets, calibrated by whole-model forwards."""
    if config.targets is None:
        raise ValueError(
            f"sparsetorch knows no block layout for model type {model_type(model)!r}: pass "
            "blocks='path.to.layers' (CLI --blocks) naming its ModuleList of decoder blocks, or "
            "targets=[...] (CLI --targets 're:.*mlp.*') to prune chosen layers in one whole-model pass"
        )
    if config.reconstruct == "block":
        raise ValueError("reconstruct='block' fits each decoder block, and sparsetorch knows none for this model: "
                         "pass blocks='path.to.layers', or use reconstruct='layer'")
    pruner.sparsity = _allocate(config, pruner, None, None)
    work = BlockWork(pruner.pending(model), [model_forward(model, chunk) for chunk in chunks], pruner,
                     want_outputs=False, precision=precision)
    strategy(work)
    _check_all_pruned(pruner, work.pending)


def _check_all_pruned(pruner: _LayerPruner, pending: set[nn.Module]) -> None:
    if pending:
        names = sorted(pruner.names[m] for m in pending)
        raise RuntimeError(f"these target layers never ran during calibration and were not pruned: {names}")


def _check_all_inside(pruner: _LayerPruner, blocks: nn.ModuleList) -> None:
    inside = {m for block in blocks for m in block.modules()}
    outside = [name for module, name in pruner.names.items() if module not in inside]
    if outside:
        raise ValueError(
            f"layers outside the decoder blocks cannot be calibrated block by block: {outside}; "
            f"keep them dense with ignore={outside} or prune them with method='magnitude'"
        )
