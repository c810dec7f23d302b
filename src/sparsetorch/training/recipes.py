"""Named recipes: each method's usual settings, scaled to a run of a given length.

The demos, the CLI and the benchmark ask for 'rigl' or 'gmp' by name and get the
Sparsifier arguments the papers use, with every step count a fraction of the run:
RigL and SET stop moving masks at 75% of training (Evci et al.), gradual pruning ramps
from 10% to 60% of training (Zhu & Gupta prune in the first half, then fine-tune).
Masks move every 100 steps as in RigL, or more often on short runs so that at least
`UPDATES` updates happen; never so often that zero-initialized weights are judged again
before they had time to grow.

RigL keeps the paper's Delta T = 100 down to runs of 4 updates (`RIGL_UPDATES`) and grows
by the dense gradient summed over the interval: its weights grow from zero and are judged
by magnitude at the next update, and one small batch's gradient is mostly noise: with a
short interval and one batch's gradient, most grown weights were dropped again at the next
update and RigL lost to static random masks (benchmarks/RESULTS.md).

Example:
    >>> recipe("rigl", steps=1000, sparsity=0.9).schedule
    RigL(sparsity=0.9, end=750, every=100, drop_fraction=0.3, decay='cosine', grad_steps=100)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparsetorch.training.dynamic import SET, RigL
from sparsetorch.training.method import Schedule
from sparsetorch.training.nm import SRSTE, ProgressiveNM
from sparsetorch.training.schedules import Gradual, Iterative, OneShot
from sparsetorch.training.srigl import SRigL

__all__ = ["RECIPES", "Recipe", "recipe", "register_recipe"]

UPDATES = 10  # at least this many mask updates in a run: Delta T = min(100, 75% of the steps / UPDATES)
RIGL_UPDATES = 4  # RigL's grown weights need the full Delta T = 100 to be judged fairly; shorter only below 4 updates


@dataclass(frozen=True)
class Recipe:
    """What to hand the Sparsifier for one named method; `schedule=None` trains dense."""

    name: str
    schedule: Schedule | None
    pattern: str | None = None
    distribution: str = "uniform"
    notes: str = ""


RecipeFn = Callable[[int, float], Recipe]
RECIPES: dict[str, RecipeFn] = {}


def register_recipe(name: str) -> Callable[[RecipeFn], RecipeFn]:
    """Decorator that adds a recipe under `name`; a name may be registered once."""

    def add(fn: RecipeFn) -> RecipeFn:
        if name in RECIPES:
            raise ValueError(f"a recipe named {name!r} is already registered")
        RECIPES[name] = fn
        return fn

    return add


def _every(steps: int, updates: int = UPDATES) -> int:
    return max(1, min(100, int(0.75 * steps) // updates))


@register_recipe("dense")
def _dense(steps: int, sparsity: float) -> Recipe:
    return Recipe("dense", None, notes="no sparsity")


@register_recipe("oneshot")
def _oneshot(steps: int, sparsity: float) -> Recipe:
    return Recipe("oneshot", OneShot(sparsity=sparsity), notes="magnitude masks at initialization, fixed")


@register_recipe("static")
def _static(steps: int, sparsity: float) -> Recipe:
    return Recipe("static", OneShot(sparsity=sparsity, score="random"), distribution="erk", notes="random ERK masks, fixed")


@register_recipe("gmp")
def _gmp(steps: int, sparsity: float) -> Recipe:
    schedule = Gradual(sparsity=sparsity, start=steps // 10, end=max(steps * 6 // 10, steps // 10 + 1), every=_every(steps))
    return Recipe("gmp", schedule, notes="cubic from 10% to 60% of training")


@register_recipe("imp")
def _imp(steps: int, sparsity: float) -> Recipe:
    round_steps = max(2, steps // 4)
    schedule = Iterative(sparsity=sparsity, rounds=3, round_steps=round_steps, rewind=round_steps // 20)
    return Recipe("imp", schedule, notes="3 prune-rewind rounds, rewinding to 5% of a round")


@register_recipe("set")
def _set(steps: int, sparsity: float) -> Recipe:
    return Recipe("set", SET(sparsity=sparsity, end=max(1, steps * 3 // 4), every=_every(steps)), distribution="erk")


@register_recipe("rigl")
def _rigl(steps: int, sparsity: float) -> Recipe:
    every = _every(steps, RIGL_UPDATES)
    schedule = RigL(sparsity=sparsity, end=max(1, steps * 3 // 4), every=every, grad_steps=every)
    return Recipe("rigl", schedule, distribution="erk", notes="grows by the gradient summed over each Delta T")


@register_recipe("srigl")
def _srigl(steps: int, sparsity: float) -> Recipe:
    schedule = SRigL(sparsity=sparsity, end=max(1, steps * 3 // 4), every=_every(steps))
    return Recipe("srigl", schedule, pattern="unstructured-row", distribution="erk")


@register_recipe("srste")
def _srste(steps: int, sparsity: float) -> Recipe:
    return Recipe("srste", SRSTE(), pattern="2:4", notes="2:4 from scratch; --sparsity is implied")


@register_recipe("progressive-nm")
def _progressive(steps: int, sparsity: float) -> Recipe:
    return Recipe("progressive-nm", ProgressiveNM(end=max(1, steps // 2)), pattern="2:4", notes="dense to 2:4 by mid-run")


def recipe(name: str, steps: int, sparsity: float) -> Recipe:
    """The recipe registered as `name`, for a run of `steps` steps at `sparsity`.

    Raises:
        ValueError: unknown name (listing the known ones) or fewer than 2 steps.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown sparse-training method {name!r}; available: {', '.join(sorted(RECIPES))}")
    if steps < 2:
        raise ValueError(f"a training run needs at least 2 steps, got {steps}")
    return RECIPES[name](steps, sparsity)
