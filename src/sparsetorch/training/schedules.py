"""Magnitude schedules: one-shot, gradual (Zhu & Gupta's cubic) and iterative with rewinding.

Each schedule is a frozen config (what the recipe is) and a registered handler (how it
turns weights into masks). Sparsity only grows here, and a pruned weight never returns:
ranking uses |w| with pruned weights at -inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sparsetorch.patterns import Pattern
from sparsetorch.training.method import (
    MaskUpdate,
    Method,
    Schedule,
    check_fraction,
    check_step,
    register_method,
)

__all__ = ["Gradual", "Iterative", "OneShot", "cubic_sparsity"]

SCORES = ("magnitude", "random")


@dataclass(frozen=True, kw_only=True)
class OneShot(Schedule):
    """Prune once, at step `at`, and keep the masks fixed from then on.

    Args:
        sparsity: final global sparsity (None for N:M patterns and per-layer maps).
        at: the step after which to prune; 0 prunes when the Sparsifier is built.
        score: 'magnitude' (|w|) or 'random' (static random masks, e.g. with ER/ERK ratios).

    Example:
        >>> OneShot(sparsity=0.9, score="random")  # a random static 90% mask
    """

    name: ClassVar[str] = "oneshot"
    at: int = 0
    score: str = "magnitude"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_step(self.at, "at")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")

    def sparsity_at(self, step: int, final: float) -> float:
        return final if step >= self.at else 0.0


@register_method(OneShot)
class OneShotMethod(Method):
    """Masks from |w| or random scores, taken once."""

    @classmethod
    def check_pattern(cls, pattern: Pattern) -> None:
        """Every pattern, N:M included, can be pruned to once."""

    @property
    def changes_masks(self) -> bool:
        return self.config.at > 0

    @property
    def from_scratch(self) -> bool:
        return self.config.score == "random" and self.config.at == 0

    def _masks(self, step: int) -> list[Tensor]:
        if self.config.score == "magnitude":
            return self.magnitude_masks(step)
        return self.scored_masks(step, self.random_scores)

    def initial_masks(self) -> MaskUpdate:
        return MaskUpdate(self._masks(0))

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate | None:
        return MaskUpdate(self._masks(step)) if step == self.config.at else None


def cubic_sparsity(step: int, final: float, *, start: int, end: int, every: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))^3.

    t is the last pruning step at or before `step` (t0, t0 + every, ...), and the final
    sparsity is reached exactly at `end`.

    Example:
        >>> cubic_sparsity(50, 0.8, start=0, end=100, every=50)
        0.7
    """
    initial = min(initial, final)
    if step < start:
        return initial
    if step >= end:
        return final
    last = start + (step - start) // every * every
    progress = (last - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True, kw_only=True)
class Gradual(Schedule):
    """Gradual magnitude pruning on the cubic schedule of Zhu & Gupta (2017).

    Args:
        sparsity: final global sparsity.
        end: the step at which the final sparsity is reached.
        start: the step of the first pruning.
        every: steps between prunings.
        initial: sparsity at `start` (clipped to each layer's final sparsity).

    Example:
        >>> Gradual(sparsity=0.9, start=200, end=2000, every=100)
    """

    name: ClassVar[str] = "gradual"
    end: int
    start: int = 0
    every: int = 100
    initial: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_step(self.start, "start")
        check_step(self.end, "end", low=self.start + 1)
        check_step(self.every, "every", low=1)
        check_fraction(self.initial, "initial")

    def sparsity_at(self, step: int, final: float) -> float:
        return cubic_sparsity(step, final, start=self.start, end=self.end, every=self.every, initial=self.initial)


@register_method(Gradual)
class GradualMethod(Method):
    """Magnitude pruning whenever the cubic schedule steps up (the base class's default)."""


@dataclass(frozen=True, kw_only=True)
class Iterative(Schedule):
    """Iterative magnitude pruning with weight rewinding (Frankle et al., 2019 and 2020).

    Training runs `rounds + 1` rounds of `round_steps` steps. At the end of round r
    (r = 1..rounds) each layer is pruned by magnitude to 1 - (1 - s)^(r / rounds), every
    parameter of the model is rewound to its value after `rewind` steps, and all optimizer
    state is cleared. Restart your learning-rate schedule with each round (for example,
    drive it by `step % round_steps`).

    Args:
        sparsity: final global sparsity, reached after the last round.
        rounds: how many times to prune.
        round_steps: training steps per round.
        rewind: the step whose weights every round restarts from (0: the initial weights).
    """

    name: ClassVar[str] = "iterative"
    rounds: int
    round_steps: int
    rewind: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_step(self.rounds, "rounds", low=1)
        check_step(self.round_steps, "round_steps", low=1)
        check_step(self.rewind, "rewind")
        if self.rewind >= self.round_steps:
            raise ValueError(f"rewind must be a step inside the first round, in [0, {self.round_steps}), got {self.rewind}")

    def sparsity_at(self, step: int, final: float) -> float:
        done = min(step // self.round_steps, self.rounds)
        return final if done == self.rounds else 1.0 - (1.0 - final) ** (done / self.rounds)


@register_method(Iterative)
class IterativeMethod(Method):
    """Prune at each round's end, then rewind every parameter to the saved weights."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.snapshot: dict[str, Tensor] | None = None

    def _save(self) -> None:
        self.snapshot = {name: param.detach().clone() for name, param in self.model.named_parameters()}

    def initial_masks(self) -> MaskUpdate:
        if self.config.rewind == 0:
            self._save()
        return super().initial_masks()

    def update(self, step: int, grads: list[Tensor] | None) -> MaskUpdate | None:
        if step == self.config.rewind:
            self._save()
        rounds, length = self.config.rounds, self.config.round_steps
        if step % length or not 1 <= step // length <= rounds:
            return None
        masks = self.magnitude_masks(step)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(self.snapshot[name])
        return MaskUpdate(masks, restart=True)

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = state["snapshot"]
