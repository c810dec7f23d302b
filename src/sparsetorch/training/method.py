"""The contract between the Sparsifier and a sparse-training method.

A method is two halves kept apart, as in pytorch/ao's config -> handler registry:
- a **schedule**: a frozen, validated dataclass that only describes the recipe
  (`RigL(sparsity=0.9, end=5000)`), with `sparsity_at(step, final)`;
- a **handler**: a `Method` subclass registered for that config type with
  `@register_method(RigL)`, which turns weights (and, for RigL, gradients) into masks.

Masks are boolean keep-masks in the module's own weight layout (True = keep). Handlers
never touch optimizers or hooks: they return a `MaskUpdate` and the Sparsifier applies it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsetorch.patterns import Pattern, check_sparsity
from sparsetorch.scores import random_scores

__all__ = [
    "METHODS",
    "Layer",
    "MaskUpdate",
    "Method",
    "Schedule",
    "kept_magnitude",
    "method_for",
    "register_method",
    "schedule_from_dict",
]

MASK = "weight_mask"
LATENT = "weight_orig"


def check_step(value: int, what: str, low: int = 0) -> int:
    """An integer step count >= `low`, or a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be a whole number of steps >= {low}, got {value!r}")
    return value


def check_fraction(value: float, what: str) -> float:
    """A number in [0, 1], or a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Base of every method config.

    Args:
        sparsity: the final global sparsity in [0, 1); None where an N:M pattern or a
            per-layer sparsity map fixes it.
    """

    name: ClassVar[str] = ""
    sparsity: float | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))

    def sparsity_at(self, step: int, final: float) -> float:
        """Scheduled sparsity of a layer whose final sparsity is `final`, after `step` steps."""
        return final

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; `schedule_from_dict` reads it back equal."""
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclass(eq=False)
class Layer:
    """One sparsified module and its final sparsity, as the methods see it."""

    name: str
    module: nn.Module
    final: float

    @property
    def weight(self) -> nn.Parameter:
        """The trained weight: the dense latent one for forward-masked (soft) methods."""
        return getattr(self.module, LATENT) if hasattr(self.module, LATENT) else self.module.weight

    @property
    def mask(self) -> Tensor:
        """The keep-mask buffer, in the weight's own layout."""
        return getattr(self.module, MASK)

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D stores its weight as (in, out)."""
        return type(self.module).__name__ == "Conv1D"

    def matrix(self, tensor: Tensor) -> Tensor:
        """`tensor` (weight-shaped) as (out, in, ...); its own inverse."""
        return tensor.t() if self.transposed else tensor

    def pattern_mask(self, pattern: Pattern, scores: Tensor, sparsity: float | None = None, **kwargs: Any) -> Tensor:
        """`pattern.mask` on weight-shaped scores, returned in the weight's layout."""
        return self.matrix(pattern.mask(self.matrix(scores), sparsity, **kwargs))


@dataclass
class MaskUpdate:
    """What a handler decided at one step.

    Args:
        masks: the new keep-mask of every layer, in order.
        restart: the handler rewound the weights (IMP): all optimizer state is cleared.
        scales: for soft methods, (forward scale, gradient scale) of the pruned weights.
    """

    masks: list[Tensor]
    restart: bool = False
    scales: tuple[float, float] | None = None


def kept_magnitude(weight: Tensor, mask: Tensor) -> Tensor:
    """|w| where kept and -inf where pruned: ranking by it never revives a pruned weight."""
    return weight.detach().abs().float().masked_fill(~mask, float("-inf"))


class Method:
    """Turns a schedule into masks. Subclasses override what their method changes.

    Attributes:
        soft: masks apply in the forward pass to a dense latent weight (SR-STE) instead
            of zeroing the weight in place.
        default_pattern: the pattern used when the Sparsifier is given none.
    """

    soft: ClassVar[bool] = False
    default_pattern: ClassVar[str] = "unstructured"

    def __init__(self, config: Schedule, layers: list[Layer], pattern: Pattern, generator: torch.Generator,
                 model: nn.Module) -> None:
        self.config, self.layers, self.pattern = config, layers, pattern
        self.generator, self.model = generator, model

    @classmethod
    def check_pattern(cls, pattern: Pattern) -> None:
        """Raise ValueError if this method cannot keep `pattern` (default: any pattern without
        a fixed sparsity, that is, not N:M)."""
        if pattern.fixed_sparsity is not None:
            raise ValueError(
                f"{cls.__name__} needs a pattern that takes any sparsity ('unstructured', 'unstructured-row', "
                f"'block-HxW'), got {pattern.spec}; for N:M train with SRSTE or ProgressiveNM"
            )

    @property
    def changes_masks(self) -> bool:
        """Whether masks change after the first step (so optimizer state must be masked)."""
        return True

    @property
    def from_scratch(self) -> bool:
        """Whether the first masks are drawn at random for a run that trains from its
        initialization (static random masks, SET, RigL, SRigL). Only such runs get the
        Sparsifier's sparse-aware initialization: masks taken by magnitude may be pruning
        a trained model, whose weights must stay as trained."""
        return False

    @property
    def refine(self) -> float:
        """For soft methods: SR-STE's decay of pruned latent weights through their gradient."""
        return 0.0

    def sparsity_at(self, layer: Layer, step: int) -> float:
        """The scheduled sparsity of `layer` after `step` steps."""
        return self.config.sparsity_at(step, layer.final)

    def scored_masks(self, step: int, score: Callable[[Layer], Tensor]) -> list[Tensor]:
        """Each layer's pattern mask of `score(layer)` at the sparsity scheduled for `step`."""
        return [layer.pattern_mask(self.pattern, score(layer), self.sparsity_at(layer, step)) for layer in self.layers]

    def random_scores(self, layer: Layer) -> Tensor:
        """Uniform scores from the sparsifier's seeded generator, on the weight's device."""
        return random_scores(layer.weight, self.generator).to(layer.weight.device)

    def magnitude_masks(self, step: int) -> list[Tensor]:
        """Keep the largest still-kept weights of each layer at the sparsity scheduled for `step`."""
        return self.scored_masks(step, lambda layer: kept_magnitude(layer.weight, layer.mask))

    def initial_masks(self) -> MaskUpdate:
        """Masks before the first step (default: magnitude at the step-0 sparsity)."""
        return MaskUpdate(self.magnitude_masks(0))

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate | None:
        """New masks at `step`, or None to keep them (default: magnitude pruning whenever
        the scheduled sparsity changes)."""
        if all(self.sparsity_at(layer, step) == self.sparsity_at(layer, step - 1) for layer in self.layers):
            return None
        return MaskUpdate(self.magnitude_masks(step))

    def needs_grads(self, step: int) -> bool:
        """Whether `update(step)` reads dense gradients (those collected since the last read)."""
        return False

    def collects_grads(self, step: int) -> bool:
        """Whether the backward of `step` adds its dense gradients to those the next read gets
        (default: only the backward of a step that reads them)."""
        return self.needs_grads(step)

    def state_dict(self) -> dict[str, Any]:
        """Handler state beyond the masks (which live in module buffers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict` output."""


METHODS: dict[type[Schedule], type[Method]] = {}
_BY_NAME: dict[str, type[Schedule]] = {}


def register_method(config_type: type[Schedule]) -> Callable[[type[Method]], type[Method]]:
    """Class decorator that makes a `Method` subclass the handler of `config_type`.

    Raises:
        ValueError: the config type or its name is registered already.
    """

    def add(handler: type[Method]) -> type[Method]:
        if config_type in METHODS or config_type.name in _BY_NAME:
            raise ValueError(f"a sparse-training method for {config_type.__name__} ({config_type.name!r}) is already registered")
        METHODS[config_type] = handler
        _BY_NAME[config_type.name] = config_type
        return handler

    return add


def method_for(config: Schedule) -> type[Method]:
    """The handler registered for `config`'s type.

    Raises:
        TypeError: `config` is not a Schedule.
        NotImplementedError: no handler is registered, with the decorator to write.
    """
    if not isinstance(config, Schedule):
        known = ", ".join(sorted(cls.__name__ for cls in METHODS))
        raise TypeError(f"schedule must be a method config such as RigL(sparsity=0.9, end=1000) ({known}), got {config!r}")
    try:
        return METHODS[type(config)]
    except KeyError:
        name = type(config).__name__
        raise NotImplementedError(
            f"no sparse-training handler for {name}; write one:\n\n"
            f"@register_method({name})\nclass {name}Method(Method):\n    def update(self, step, grads): ..."
        ) from None


def schedule_names() -> list[str]:
    """Names of the registered methods, as `schedule_from_dict` reads them."""
    return sorted(_BY_NAME)


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Build a schedule from `Schedule.to_dict` output: {'method': name, **fields}.

    Raises:
        ValueError: unknown method name (listing the known ones) or unknown fields.
    """
    data = dict(data)
    name = data.pop("method", None)
    if name not in _BY_NAME:
        raise ValueError(f"unknown sparse-training method {name!r}; available: {', '.join(schedule_names())}")
    config_type = _BY_NAME[name]
    known = {field.name for field in dataclasses.fields(config_type)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {config_type.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    return config_type(**data)
