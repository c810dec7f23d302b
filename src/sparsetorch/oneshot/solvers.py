"""Layer solvers: prune one weight matrix given its calibration statistic.

A solver is a pure function `(weights, statistic, pattern, sparsity, options) ->
[(new_weight, keep_mask), ...]` registered under a method name. It gets the weights of
all layers that share one input (q/k/v) together, so it may solve them in one sweep.
Registering a name twice is an error; asking for an unknown one lists what exists.

A solver registered with `quantizes=True` also quantizes jointly with pruning: given
`options.quantize` (a QuantScheme) it returns `(new_weight, keep_mask, grid)` with every kept
weight on `grid`. The pipeline rounds the other solvers' weights to nearest afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsetorch.oneshot.sparsegpt import inverse_hessian_factor, sparsegpt_prune_many, sparsegpt_quantize_many
from sparsetorch.oneshot.stats import Gram, InputSqNorms, Statistic
from sparsetorch.patterns import Pattern
from sparsetorch.quantize import QuantScheme
from sparsetorch.scores import magnitude_scores, random_scores, wanda_scores

__all__ = ["SOLVERS", "Solver", "SolverOptions", "get_solver", "register_solver"]


@dataclass(frozen=True)
class SolverOptions:
    """Knobs some solvers read; the rest ignore them. `quantize` is given only to solvers
    registered with `quantizes=True`."""

    dampening: float = 0.01
    block_size: int = 128
    seed: int = 0
    quantize: QuantScheme | None = None


SolveFn = Callable[[list[Tensor], "Statistic | None", Pattern, float, SolverOptions], list[tuple[Tensor, ...]]]


@dataclass(frozen=True)
class Solver:
    """A pruning method: its layer function, the statistic it needs (None: data-free), and whether
    it quantizes jointly with pruning (then it returns a grid per layer when asked to quantize)."""

    name: str
    solve: SolveFn
    statistic: type[Statistic] | None
    summary: str
    quantizes: bool = False


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str, statistic: type[Statistic] | None, summary: str, *,
                    quantizes: bool = False) -> Callable[[SolveFn], SolveFn]:
    """Decorator that adds a solver under `name`; a name may be registered once. `quantizes`: the
    solver reads `SolverOptions.quantize` and returns (weight, keep, grid) when it is set."""

    def add(fn: SolveFn) -> SolveFn:
        if name in SOLVERS:
            raise ValueError(f"a solver named {name!r} is already registered")
        SOLVERS[name] = Solver(name, fn, statistic, summary, quantizes)
        return fn

    return add


def get_solver(name: str) -> Solver:
    """The solver registered as `name`.

    Raises:
        ValueError: no such method, listing the registered ones.
    """
    try:
        return SOLVERS[name]
    except KeyError:
        known = ", ".join(sorted(SOLVERS))
        raise ValueError(
            f"unknown pruning method {name!r}; available: {known}. "
            "New methods are added with @sparsetorch.oneshot.register_solver(name, statistic, summary)"
        ) from None


def _masked(weights: list[Tensor], score: Callable[[Tensor], Tensor], pattern: Pattern,
            sparsity: float) -> list[tuple[Tensor, Tensor]]:
    """Zero the lowest-scored weights: +0.0, never -0.0, so every stored form is bit-identical.
    Each layer's scores are made and dropped in turn: a block's scores are never all in memory."""
    results = []
    for weight in weights:
        keep = pattern.mask(score(weight), sparsity)
        results.append((weight.masked_fill(~keep, 0.0), keep))
    return results


@register_solver("magnitude", None, "keep the largest |W|; no calibration data")
def _magnitude(weights: list[Tensor], stat: Statistic | None, pattern: Pattern, sparsity: float, opts: SolverOptions):
    return _masked(weights, magnitude_scores, pattern, sparsity)


@register_solver("random", None, "keep a random subset; the baseline every method must beat")
def _random(weights: list[Tensor], stat: Statistic | None, pattern: Pattern, sparsity: float, opts: SolverOptions):
    generator = torch.Generator().manual_seed(opts.seed)
    return _masked(weights, lambda w: random_scores(w, generator), pattern, sparsity)


@register_solver("wanda", InputSqNorms, "keep the largest |W| * ||X||; one pass, no weight update")
def _wanda(weights: list[Tensor], stat: Statistic | None, pattern: Pattern, sparsity: float, opts: SolverOptions):
    norms = stat.input_sq_norms()
    return _masked(weights, lambda w: wanda_scores(w, norms), pattern, sparsity)


@register_solver("sparsegpt", Gram, "OBS column sweep with lazy updates; reconstructs the kept weights",
                 quantizes=True)
def _sparsegpt(weights: list[Tensor], stat: Statistic | None, pattern: Pattern, sparsity: float, opts: SolverOptions):
    key = ("inverse_hessian_factor", opts.dampening)
    if key not in stat.cache:  # layers pruned one at a time (pruned inputs) still share it
        stat.cache[key] = inverse_hessian_factor(stat.value, opts.dampening)
    if opts.quantize is not None:  # the paper's joint mode
        return sparsegpt_quantize_many(weights, stat.value, pattern, sparsity, opts.quantize,
                                       block_size=opts.block_size, hinv=stat.cache[key])
    return sparsegpt_prune_many(
        weights, stat.value, pattern, sparsity, block_size=opts.block_size, hinv=stat.cache[key]
    )
