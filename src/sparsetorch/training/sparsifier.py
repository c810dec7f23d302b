"""The Sparsifier: sparse training inside any PyTorch loop, with one call per step.

    sparsifier = Sparsifier(model, RigL(sparsity=0.9, end=3000), distribution="erk", optimizer=optimizer)
    for x, y in data:
        loss_fn(model(x), y).backward()
        optimizer.step()
        sparsifier.step()          # after optimizer.step(), before optimizer.zero_grad()
        optimizer.zero_grad()

What it guarantees after every `step()`:
- each target layer's mask prunes exactly the count its pattern gives for the scheduled
  sparsity (patterns count exactly), and pruned weights are exactly +0.0;
- gradients of pruned weights are zeroed before the optimizer sees them, and optimizer
  state (momentum, Adam moments) of pruned or newly grown weights is zeroed whenever masks
  change, so neither momentum nor weight decay can revive a pruned weight;
- masks are module buffers (`<layer>.weight_mask`): `model.state_dict()` saves them and
  `model.load_state_dict()` restores them; `sparsifier.state_dict()` holds the rest (step,
  random state, method state), so a resumed run continues bit-identically;
- decisions use only data that is identical on every rank (weights that DDP keeps in
  sync, gradients averaged over ranks, a seeded generator), so masks agree under
  DistributedDataParallel;
- it works under `torch.autocast` and with `torch.compile`d models: masking happens in
  gradient hooks and in place between steps, outside the compiled graph.

Sparse-aware initialization (`init="sparse"`, the default): a dense initialization sets
each weight's variance for the unit's dense fan-in, so a random mask that keeps a
fraction d of a unit's inputs shrinks its preactivation variance by d, layer after
layer, and a deep network starts with a vanishing signal and gradient that it needs many
steps to recover from (Evci et al., 2022, "Gradient flow in sparse neural networks and
how lottery tickets win"). For runs that draw their first masks at random to train from
scratch (static random masks, SET, RigL, SRigL), the kept weights of each output unit are
multiplied once, right after the first masks, by sqrt(dense fan-in / kept fan-in), which
gives every unit the variance the dense initialization meant. Runs that start dense or
from magnitude masks (GMP, IMP, one-shot magnitude) and masks given by the caller keep
their weights: those may be trained values. Regrown weights start at zero, as in RigL.

Training FLOPs: `step(tokens=...)` adds the step's forward and backward FLOPs of the target
layers at their current density to `training_flops` (see `step_flops`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparsetorch.patterns import Pattern, parse_pattern
from sparsetorch.targets import find_targets, is_prunable
from sparsetorch.training.distributions import layer_sparsities
from sparsetorch.training.masking import SCALE, attach_hard, attach_soft, detach, refresh_soft, set_scales
from sparsetorch.training.method import Layer, MaskUpdate, Schedule, method_for

__all__ = ["DEFAULT_TARGETS", "INITS", "Sparsifier", "fan_in_scales", "is_sparse_trainable"]

DEFAULT_TARGETS: tuple[str, ...] = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d")
INITS: tuple[str, ...] = ("sparse", "keep")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_sparse_trainable(module: nn.Module) -> bool:
    """Linear, GPT-2's Conv1D and (unlike one-shot pruning) convolutions."""
    return is_prunable(module) or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def fan_in_scales(mask: Tensor) -> Tensor:
    """Per output unit, sqrt(dense fan-in / kept fan-in): the factor that gives the unit's
    kept weights the variance its dense initialization meant for all of its inputs.

    Args:
        mask: boolean keep-mask laid out (out, in, ...), as `Layer.matrix` gives it.

    Returns:
        (out,) float factors; 1 for a unit that keeps no input (nothing to rescale).

    Example:
        >>> fan_in_scales(torch.tensor([[True, False, False, False], [True, True, True, True]]))
        tensor([2., 1.])
    """
    rows = mask.reshape(mask.shape[0], -1)  # (out, fan-in)
    kept = rows.sum(dim=1).float()
    return torch.where(kept > 0, (rows.shape[1] / kept.clamp(min=1)).sqrt(), torch.ones_like(kept))


def _given_masks(modules: dict[str, nn.Module], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The caller's keep-mask of every target layer, in target order, checked against its weight."""
    missing = [name for name in modules if name not in masks]
    if missing:
        raise ValueError(f"masks has no entry for target layers {missing[:4]}; give a keep-mask for every target "
                         "layer, or leave the layer out with ignore=[...]")
    given = {}
    for name, module in modules.items():
        mask = masks[name]
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a boolean tensor (True = keep), got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != module.weight.shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, but the layer's weight is "
                             f"{tuple(module.weight.shape)}")
        given[name] = mask.to(module.weight.device)
    return given


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Sparsifier:
    """Masks the target layers of `model` and moves the masks along a schedule.

    Args:
        model: any module (a DDP-wrapped one too).
        schedule: the method config: OneShot, Gradual, Iterative, SET, RigL, SRigL, SRSTE
            or ProgressiveNM.
        pattern: 'unstructured', 'unstructured-row', 'N:M', 'block-HxW' or a Pattern
            (default: the method's own, e.g. 2:4 for SRSTE).
        distribution: 'uniform', 'er', 'erk' or a {layer: sparsity} map.
        targets: module patterns to sparsify (default: every Linear, Conv1D and Conv layer).
        ignore: module patterns to keep dense (default: `lm_head`).
        optimizer: the optimizer training `model`; needed whenever masks change during
            training, to zero the state of pruned and regrown weights.
        seed: seeds the generator behind random masks and SET's regrowth; give every
            rank the same seed.
        masks: {layer name: boolean keep-mask} to start from instead of the schedule's own
            first masks, e.g. `{name: module.weight != 0}` to keep exactly the zeros of a
            model pruned one-shot (with `OneShot()` they then stay fixed). Every target
            layer needs one; where neither the schedule nor the distribution sets a
            sparsity, each layer's final sparsity is its mask's. Given masks are never
            rescaled by `init`.
        init: 'sparse' rescales the kept weights of each unit to its sparse fan-in once,
            after the first masks, for methods that draw them at random to train from
            scratch (see the module docstring); 'keep' leaves the weights as they are.

    Attributes:
        training_flops: forward and backward FLOPs of the target layers over the steps
            that were given `tokens` (see `step_flops`).
        rescaled: whether the sparse-aware initialization rescaled this run's weights.

    Raises:
        ValueError: a bad sparsity, pattern, distribution, target set or `init`, a method
            that changes masks without an optimizer, or `masks` that miss a target layer
            or do not fit its weight.
        TypeError: `schedule` is not a method config, or a mask is not boolean.

    Example:
        >>> sparsifier = Sparsifier(model, Gradual(sparsity=0.9, start=100, end=1000), optimizer=opt)
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        *,
        pattern: str | Pattern | None = None,
        distribution: str | Mapping[str, float] = "uniform",
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        masks: Mapping[str, Tensor] | None = None,
        init: str = "sparse",
    ) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} ('sparse' rescales random initial masks to their fan-in, "
                             f"'keep' leaves the weights), got {init!r}")
        handler = method_for(schedule)
        self.model, self.schedule, self.optimizer = model, schedule, optimizer
        self.pattern = parse_pattern(handler.default_pattern if pattern is None else pattern)
        handler.check_pattern(self.pattern)
        modules = find_targets(model, DEFAULT_TARGETS if targets is None else targets, ignore, prunable=is_sparse_trainable)
        given = None if masks is None else _given_masks(modules, masks)
        finals = self._final_sparsities(modules, distribution, given)
        self.layers = [Layer(name, module, finals[name]) for name, module in modules.items()]
        self.generator = torch.Generator().manual_seed(seed)
        self.method = handler(schedule, self.layers, self.pattern, self.generator, model)
        self._check_optimizer()
        self.init = init
        self.step_count = 0
        self.training_flops = 0
        self._grads: dict[int, Tensor] = {}
        self._handles = [self._attach(index, layer) for index, layer in enumerate(self.layers)]
        first = self.method.initial_masks()  # even when replaced: a method may set itself up here (IMP's rewind point)
        self._apply(first if given is None else MaskUpdate(list(given.values())))
        self.rescaled = init == "sparse" and given is None and self.method.from_scratch
        if self.rescaled:
            self._rescale()
        self._collecting = self.method.collects_grads(1)

    # ---- setup -------------------------------------------------------------------------

    def _final_sparsities(self, modules: dict[str, nn.Module], distribution: str | Mapping[str, float],
                          given: dict[str, Tensor] | None = None) -> dict[str, float]:
        shapes = {}
        for name, module in modules.items():
            shape = tuple(Layer(name, module, 0.0).matrix(module.weight).shape)
            try:
                self.pattern.check_shape(shape)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}; leave it out with ignore=[{name!r}]") from None
            shapes[name] = shape
        if given is not None and self.schedule.sparsity is None and distribution == "uniform":
            return {name: 1.0 - mask.float().mean().item() for name, mask in given.items()}
        if self.pattern.fixed_sparsity is None:
            return layer_sparsities(distribution, shapes, self.schedule.sparsity)
        if distribution != "uniform":
            raise ValueError(f"pattern {self.pattern.spec} fixes every layer's sparsity; use distribution='uniform'")
        return dict.fromkeys(shapes, self.pattern.resolve_sparsity(self.schedule.sparsity))

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            if self.method.changes_masks and not self.method.soft:
                raise ValueError(
                    f"{type(self.schedule).__name__} changes masks during training: pass optimizer=... so the "
                    "state of pruned and regrown weights is zeroed"
                )
            return
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [layer.name for layer in self.layers if id(layer.weight) not in held]
        if missing:
            raise ValueError(f"the optimizer does not train the weights of {missing[:4]}: build it from this model's parameters")

    @torch.no_grad()
    def _rescale(self) -> None:
        for layer in self.layers:
            weight = layer.matrix(layer.weight)  # (out, in, ...), a view of the parameter
            scales = fan_in_scales(layer.matrix(layer.mask)).to(weight.dtype)
            weight.mul_(scales.view(-1, *[1] * (weight.dim() - 1)))
            if self.method.soft:
                refresh_soft(layer.module)

    def _attach(self, index: int, layer: Layer):
        if self.method.soft:
            return attach_soft(layer.module, self.method.refine)
        return attach_hard(layer.module, lambda grad: self._collect(index, grad))

    # ---- the training step -------------------------------------------------------------

    def _collect(self, index: int, grad: Tensor) -> None:
        if self._collecting:
            held = self._grads.get(index)
            self._grads[index] = grad.detach().clone() if held is None else held.add_(grad)

    def _take_grads(self) -> list[Tensor]:
        if len(self._grads) != len(self.layers):
            raise RuntimeError(
                f"{type(self.schedule).__name__} needs the dense gradients of step {self.step_count}: call "
                "loss.backward() before sparsifier.step()"
            )
        grads = [self._grads.pop(index) for index in range(len(self.layers))]
        if _distributed():
            for grad in grads:
                dist.all_reduce(grad)
                grad /= dist.get_world_size()
        return grads

    def step(self, tokens: int | Mapping[str, int] | None = None) -> bool:
        """Advance one training step: update masks where the schedule says so and zero every
        pruned weight. Call it after `optimizer.step()` and before `optimizer.zero_grad()`.

        Args:
            tokens: the rows this step's batch sent through each target layer, to add the
                step's cost to `training_flops` (see `step_flops`); None counts nothing.

        Returns:
            True when the masks changed at this step.

        Raises:
            ValueError: bad `tokens` (see `step_flops`).
        """
        if not self.layers:
            raise RuntimeError("this sparsifier was finalized; build a new one to keep training sparse")
        if tokens is not None:
            self.training_flops += self.step_flops(tokens)
        self.step_count += 1
        grads = self._take_grads() if self.method.needs_grads(self.step_count) else None
        self._collecting = self.method.collects_grads(self.step_count + 1)
        if not self._collecting:
            self._grads.clear()
        update = self.method.update(self.step_count, grads)
        if update is not None:
            self._apply(update)
        elif not self.method.soft:
            self._enforce()
        return update is not None

    def step_flops(self, tokens: int | Mapping[str, int]) -> int:
        """Training FLOPs of the target layers for the step in progress, at the masks it
        trains with.

        A layer holding `kept` of its `numel` weights costs, per row of its input,
        2 * kept in the forward pass and as much again for the input gradient; the weight
        gradient costs 2 * kept too, or 2 * numel where it is dense: at steps whose dense
        gradient RigL or SRigL reads (as Evci et al. count RigL's cost), and always for
        soft methods, which train the dense latent weight. Forward-pass weights of a soft
        method count dense while its pruned entries still weigh in (progressive N:M).

        Args:
            tokens: rows per target layer: an int for models of Linear (and GPT-2 Conv1D)
                layers, where a row is a token or an example (batch x sequence length);
                or {layer name: rows}, which convolutions need: a convolution's rows are
                batch x its output positions, which only the caller knows.

        Returns:
            FLOPs, an int.

        Raises:
            ValueError: a negative count, a layer missing from the map, or an int for a
                model with convolutions.

        Example:
            >>> sparsifier.step(tokens=batch_size * seq_len)   # adds step_flops to training_flops
            >>> sparsifier.training_flops
        """
        rows = self._rows(tokens)
        dense_grads = self.method.soft or self._collecting
        flops = 0
        for layer, forward, count in zip(self.layers, self._forward_weights(), rows):
            numel = layer.mask.numel()
            flops += count * 2 * (2 * forward + (numel if dense_grads else forward))
        return flops

    def _rows(self, tokens: int | Mapping[str, int]) -> list[int]:
        if isinstance(tokens, Mapping):
            missing = [layer.name for layer in self.layers if layer.name not in tokens]
            if missing:
                raise ValueError(f"tokens has no row count for target layers {missing[:4]}; give every target layer one")
            rows = [tokens[layer.name] for layer in self.layers]
        else:
            convs = [layer.name for layer in self.layers if isinstance(layer.module, CONVOLUTIONS)]
            if convs:
                raise ValueError(f"layers {convs[:4]} are convolutions, whose rows are batch x output positions: pass "
                                 "tokens={layer name: rows} for every target layer")
            rows = [tokens] * len(self.layers)
        for layer, count in zip(self.layers, rows):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"tokens for layer {layer.name!r} must be a whole number >= 0, got {count!r}")
        return rows

    def _forward_weights(self) -> list[int]:
        """Weights each layer multiplies in the forward pass (read from the buffers, which
        `model.load_state_dict` may have replaced): the kept ones, or all of a soft layer
        whose pruned entries still weigh in."""
        counts = []
        for layer in self.layers:
            kept = layer.mask.sum()
            if self.method.soft:
                kept = torch.where(getattr(layer.module, SCALE)[0] != 0, layer.mask.numel(), kept)
            counts.append(kept)
        return torch.stack(counts).tolist()  # one device sync per counted step

    @torch.no_grad()
    def _enforce(self) -> None:
        for layer in self.layers:
            layer.weight.masked_fill_(~layer.mask, 0.0)

    @torch.no_grad()
    def _apply(self, update: MaskUpdate) -> None:
        if update.restart and self.optimizer is not None:
            for param in self.model.parameters():
                self.optimizer.state.pop(param, None)
        for layer, new in zip(self.layers, update.masks):
            if self.method.soft:
                self._apply_soft(layer, new, update.scales)
                continue
            dropped_or_grown = ~(layer.mask & new)
            layer.weight.masked_fill_(dropped_or_grown, 0.0)
            self._zero_state(layer.weight, dropped_or_grown)
            layer.mask.copy_(new)

    def _apply_soft(self, layer: Layer, mask: Tensor, scales: tuple[float, float] | None) -> None:
        layer.mask.copy_(mask)
        if scales is not None:
            set_scales(layer.module, *scales)
        refresh_soft(layer.module)

    def _zero_state(self, param: Tensor, where: Tensor) -> None:
        state = {} if self.optimizer is None else self.optimizer.state.get(param, {})
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(where, 0)

    # ---- reading and saving ------------------------------------------------------------

    def masks(self) -> dict[str, Tensor]:
        """{layer name: boolean keep-mask}, in each weight's own layout."""
        return {layer.name: layer.mask.clone() for layer in self.layers}

    def sparsity(self) -> dict[str, float]:
        """{layer name: fraction of pruned weights} as the masks stand now."""
        return {layer.name: 1.0 - layer.mask.float().mean().item() for layer in self.layers}

    def scheduled_sparsity(self, step: int | None = None) -> dict[str, float]:
        """{layer name: sparsity the schedule sets at `step`} (default: the current step)."""
        step = self.step_count if step is None else step
        return {layer.name: self.method.sparsity_at(layer, step) for layer in self.layers}

    def state_dict(self) -> dict[str, Any]:
        """Step, random state, method state, any gradients summed so far for the next
        update (RigL's `grad_steps`), the FLOPs count and whether the initialization was
        rescaled; masks and weights are saved by `model.state_dict()`."""
        return {
            "step": self.step_count,
            "init": {"mode": self.init, "rescaled": self.rescaled},
            "flops": self.training_flops,
            "schedule": self.schedule.to_dict(),
            "pattern": self.pattern.spec,
            "generator": self.generator.get_state(),
            "method": self.method.state_dict(),
            "grads": {index: grad.clone() for index, grad in self._grads.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict` output (load the model's state dict as well).

        The initialization is never applied again: the saved weights come from the model's
        state dict, and `rescaled` is set to what the saved run did.

        Raises:
            ValueError: the state was saved for another schedule or pattern.
        """
        mine = {"schedule": self.schedule.to_dict(), "pattern": self.pattern.spec}
        theirs = {"schedule": state.get("schedule"), "pattern": state.get("pattern")}
        if mine != theirs:
            raise ValueError(f"this sparsifier state was saved for {theirs}, not {mine}")
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state["method"])
        self._grads = {int(index): grad.clone() for index, grad in state.get("grads", {}).items()}
        self.rescaled = bool(state.get("init", {}).get("rescaled", False))
        self.training_flops = int(state.get("flops", 0))
        self._collecting = self.method.collects_grads(self.step_count + 1)

    def finalize(self) -> dict[str, Tensor]:
        """Bake the masks in and detach: weights become plain parameters with exact zeros,
        hooks and mask buffers go. The sparsifier cannot step afterwards.

        Returns:
            {layer name: final keep-mask}.
        """
        masks = {layer.name: detach(layer.module, handle) for layer, handle in zip(self.layers, self._handles)}
        self.layers, self._handles = [], []
        return masks
