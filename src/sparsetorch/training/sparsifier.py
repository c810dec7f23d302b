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
from sparsetorch.training.masking import attach_hard, attach_soft, detach, refresh_soft, set_scales
from sparsetorch.training.method import Layer, MaskUpdate, Schedule, method_for

__all__ = ["DEFAULT_TARGETS", "Sparsifier", "is_sparse_trainable"]

DEFAULT_TARGETS: tuple[str, ...] = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d")


def is_sparse_trainable(module: nn.Module) -> bool:
    """Linear, GPT-2's Conv1D and (unlike one-shot pruning) convolutions."""
    return is_prunable(module) or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


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
            sparsity, each layer's final sparsity is its mask's.

    Raises:
        ValueError: a bad sparsity, pattern, distribution or target set, a method that
            changes masks without an optimizer, or `masks` that miss a target layer or
            do not fit its weight.
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
    ) -> None:
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
        self.step_count = 0
        self._grads: dict[int, Tensor] = {}
        self._handles = [self._attach(index, layer) for index, layer in enumerate(self.layers)]
        first = self.method.initial_masks()  # even when replaced: a method may set itself up here (IMP's rewind point)
        self._apply(first if given is None else MaskUpdate(list(given.values())))
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

    def step(self) -> bool:
        """Advance one training step: update masks where the schedule says so and zero every
        pruned weight. Call it after `optimizer.step()` and before `optimizer.zero_grad()`.

        Returns:
            True when the masks changed at this step.
        """
        if not self.layers:
            raise RuntimeError("this sparsifier was finalized; build a new one to keep training sparse")
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
        """Step, random state, method state and any gradients summed so far for the next
        update (RigL's `grad_steps`); masks are saved by `model.state_dict()`."""
        return {
            "step": self.step_count,
            "schedule": self.schedule.to_dict(),
            "pattern": self.pattern.spec,
            "generator": self.generator.get_state(),
            "method": self.method.state_dict(),
            "grads": {index: grad.clone() for index, grad in self._grads.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict` output (load the model's state dict as well).

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
