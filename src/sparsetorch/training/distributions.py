"""How a global sparsity is shared out among layers: uniform, ER, ERK or a per-layer map.

Erdős-Rényi (Mocanu et al., 2018) gives a layer a density proportional to
(n_in + n_out) / (n_in * n_out); ERK (Evci et al., 2020, "RigL") also counts the kernel
size, (sum of all dims) / (product of all dims). Small layers so get denser and the
total count of kept weights still matches the global target. Where the scaled density of
a layer would exceed 1, that layer is kept dense and the others are solved again (the
dense-layer re-solve), until every layer fits.

Example:
    >>> layer_sparsities("erk", {"a": (100, 10), "b": (100, 100)}, 0.9)
    {'a': 0.7..., 'b': 0.9...}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from sparsetorch.patterns import check_sparsity
from sparsetorch.targets import matches

__all__ = ["DISTRIBUTIONS", "er_score", "erk_score", "layer_sparsities", "register_distribution", "scaled_densities"]

Shape = Sequence[int]
Distribution = Callable[[dict[str, Shape], float], dict[str, float]]

DISTRIBUTIONS: dict[str, Distribution] = {}


def register_distribution(name: str) -> Callable[[Distribution], Distribution]:
    """Decorator that adds a distribution under `name`; a name may be registered once."""

    def add(fn: Distribution) -> Distribution:
        if name in DISTRIBUTIONS:
            raise ValueError(f"a distribution named {name!r} is already registered")
        DISTRIBUTIONS[name] = fn
        return fn

    return add


def er_score(shape: Shape) -> float:
    """Erdős-Rényi: (n_out + n_in) / (n_out * n_in); kernel dims are ignored."""
    n_out, n_in = shape[0], shape[1]
    return (n_out + n_in) / (n_out * n_in)


def erk_score(shape: Shape) -> float:
    """Erdős-Rényi-Kernel: sum of all dims over their product, e.g. (o+i+kh+kw)/(o*i*kh*kw)."""
    return sum(shape) / math.prod(shape)


def scaled_densities(scores: dict[str, float], sizes: dict[str, int], density: float) -> dict[str, float]:
    """Densities eps * score that keep `density` of all weights, with no layer above 1.

    Solves sum_l min(1, eps * score_l) * size_l = density * sum_l size_l: layers whose
    density would pass 1 are made dense, largest score first, and eps is solved again.

    Example:
        >>> scaled_densities({"a": 1.0, "b": 4.0}, {"a": 100, "b": 100}, 0.5)
        {'a': 0.0, 'b': 1.0}
    """
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [name for name in scores if name not in dense]
        left = budget - sum(sizes[name] for name in dense)
        weight = sum(scores[name] * sizes[name] for name in free)
        eps = left / weight if weight > 0 else 0.0
        over = [name for name in free if eps * scores[name] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda name: scores[name]))
    return {name: 1.0 if name in dense else eps * scores[name] for name in scores}


def _sparsities_from_scores(shapes: dict[str, Shape], sparsity: float, score: Callable[[Shape], float]) -> dict[str, float]:
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    densities = scaled_densities({name: score(shape) for name, shape in shapes.items()}, sizes, 1.0 - sparsity)
    return {name: max(1.0 - density, 0.0) for name, density in densities.items()}


@register_distribution("uniform")
def uniform(shapes: dict[str, Shape], sparsity: float) -> dict[str, float]:
    """Every layer gets the global sparsity."""
    return dict.fromkeys(shapes, sparsity)


@register_distribution("er")
def erdos_renyi(shapes: dict[str, Shape], sparsity: float) -> dict[str, float]:
    """Density proportional to (n_in + n_out) / (n_in * n_out), scaled to the global target."""
    return _sparsities_from_scores(shapes, sparsity, er_score)


@register_distribution("erk")
def erdos_renyi_kernel(shapes: dict[str, Shape], sparsity: float) -> dict[str, float]:
    """Density proportional to sum(shape) / prod(shape), scaled to the global target."""
    return _sparsities_from_scores(shapes, sparsity, erk_score)


def _custom(mapping: Mapping[str, float], shapes: dict[str, Shape]) -> dict[str, float]:
    result = {}
    for name in shapes:
        hits = [key for key in mapping if matches(name, None, [key])]  # by name only: no module at hand
        if not hits:
            raise ValueError(
                f"the per-layer sparsity map has no entry for layer {name!r}; add one (a name, suffix or "
                "'re:<regex>') or leave the layer out with ignore=[...]"
            )
        result[name] = check_sparsity(mapping[hits[0]])
    return result


def layer_sparsities(
    distribution: str | Mapping[str, float],
    shapes: dict[str, Shape],
    sparsity: float | None,
) -> dict[str, float]:
    """The final sparsity of each layer.

    Args:
        distribution: 'uniform', 'er', 'erk', or a map from layer name (exact, suffix or
            're:<regex>'; the first matching key wins) to that layer's sparsity.
        shapes: weight shape of each layer, (out, in, *kernel).
        sparsity: the global target; must be None with a per-layer map, which fixes it.

    Returns:
        {layer name: sparsity in [0, 1)}.

    Raises:
        ValueError: unknown distribution name, sparsity out of range, or a map that misses
            a layer or comes with a global sparsity too.

    Example:
        >>> layer_sparsities({"fc1": 0.5, "re:.*": 0.9}, {"fc1": (4, 4), "fc2": (4, 4)}, None)
        {'fc1': 0.5, 'fc2': 0.9}
    """
    if isinstance(distribution, Mapping):
        if sparsity is not None:
            raise ValueError("a per-layer sparsity map fixes every layer's sparsity: pass sparsity=None with it")
        return _custom(distribution, shapes)
    if distribution not in DISTRIBUTIONS:
        known = ", ".join(sorted(DISTRIBUTIONS))
        raise ValueError(f"unknown distribution {distribution!r}; available: {known}, or a {{layer: sparsity}} map")
    if sparsity is None:
        raise ValueError(f"distribution {distribution!r} needs a global sparsity in [0, 1)")
    return DISTRIBUTIONS[distribution](shapes, check_sparsity(sparsity))
