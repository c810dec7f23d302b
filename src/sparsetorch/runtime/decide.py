"""Per layer: which sparse format to run, or dense, by timing each against dense.

A layer reaches here as a boolean mask plus its nonzero values (row-major), which is what a
pruned Linear and a stored bitmask both give without building a dense weight. Timings are
cached per (kind, shape, batch, density to 1%), so the thirty alike layers of a model are
measured once and decided alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsetorch.formats.base import SparseWeight
from sparsetorch.formats.nm import NMTensor, find_nm
from sparsetorch.formats.registry import get_format
from sparsetorch.kernels.dispatch import bind_kernel, kernel_name
from sparsetorch.runtime.config import RuntimeConfig
from sparsetorch.runtime.timing import Timer, Trial

__all__ = ["DENSE", "LayerDecision", "TimingCache", "candidate_weights", "choose", "decide_layer", "rule_format"]

DENSE = "dense"


@dataclass(frozen=True)
class LayerDecision:
    """What was decided for one layer, and the median seconds behind it ({kind: {batch: s}})."""

    name: str
    shape: tuple[int, int]
    density: float
    chosen: str
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    reason: str = ""

    def speedup(self, kind: str | None = None) -> dict[int, float]:
        """Dense time over `kind`'s (default: the chosen one) per batch size."""
        kind = kind or self.chosen
        dense, other = self.seconds.get(DENSE, {}), self.seconds.get(kind, {})
        return {b: dense[b] / other[b] for b in other if b in dense and other[b] > 0}


def rule_format(mask: Tensor, formats: tuple[str, ...]) -> str:
    """The fixed rule of policy 'always': 'nm' for a 2:4 mask, else 'bitmask' (else the first format)."""
    if "nm" in formats and find_nm(mask, ((2, 4),)) is not None:
        return "nm"
    return "bitmask" if "bitmask" in formats else formats[0]


def candidate_weights(mask: Tensor, values: Tensor, formats: tuple[str, ...]) -> dict[str, SparseWeight]:
    """The weight in each of `formats` it fits (N:M only if the mask is N:M), built from mask and values."""
    weights: dict[str, SparseWeight] = {}
    for fmt in formats:
        if fmt == "nm":
            nm = find_nm(mask)
            if nm is not None:
                weights[fmt] = NMTensor.from_mask(mask, values, *nm)
        elif fmt != "csr16" or mask.shape[1] <= 1 << 16:
            weights[fmt] = get_format(fmt).from_mask(mask, values)
    return weights


def choose(seconds: dict[str, dict[int, float]], min_speedup: float) -> str:
    """The kind at least `min_speedup` times faster than dense at every batch size, fastest by
    geometric mean over batch sizes; DENSE when none is.

    Example:
        >>> choose({"dense": {1: 1.0}, "nm": {1: 0.6}, "bitmask": {1: 0.5}}, 1.05)
        'bitmask'
    """
    dense = seconds[DENSE]
    best, best_score = DENSE, 0.0
    for kind, times in seconds.items():
        if kind == DENSE:
            continue
        ratios = [dense[b] / times[b] for b in dense]
        score = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        if min(ratios) >= min_speedup and score > best_score:
            best, best_score = kind, score
    return best


class TimingCache:
    """Median seconds per Trial, filled by a Timer; dense runs use a random weight of the shape."""

    def __init__(self, timer: Timer, seed: int = 0) -> None:
        self.timer = timer
        self.seconds: dict[Trial, float] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def _input(self, batch: int, cols: int) -> Tensor:
        return torch.randn(batch, cols, generator=self._generator)

    def measure(self, weights: dict[str, SparseWeight], shape: tuple[int, int], density: float,
                config: RuntimeConfig) -> dict[str, dict[int, float]]:
        """{kind: {batch: seconds}} for dense and every weight, timing only trials not seen before."""
        rows, cols = shape
        runs, dense = {}, None
        for batch in config.batch_sizes:
            x = self._input(batch, cols)
            trial = Trial(DENSE, shape, batch, 1.0)
            if trial not in self.seconds:
                dense = dense if dense is not None else torch.randn(rows, cols, generator=self._generator)
                runs[trial] = (lambda x=x, w=dense: F.linear(x, w))
            for kind, weight in weights.items():
                trial = Trial(kind, shape, batch, round(density, 2))
                if trial not in self.seconds:
                    run = bind_kernel(weight, x, config.backend)
                    runs[trial] = (lambda x=x, run=run: run(x, None))
        if runs:
            self.seconds.update(self.timer(runs))
        return {kind: {b: self.seconds[Trial(kind, shape, b, 1.0 if kind == DENSE else round(density, 2))]
                       for b in config.batch_sizes}
                for kind in (DENSE, *weights)}


def decide_layer(name: str, mask: Tensor, values: Tensor, config: RuntimeConfig,
                 cache: TimingCache | None) -> tuple[LayerDecision, SparseWeight | None]:
    """Decide one layer: (the decision, the weight in the chosen format or None for dense)."""
    shape = (mask.shape[0], mask.shape[1])
    density = float(values.numel()) / max(mask.numel(), 1)
    if density > config.max_density:
        return LayerDecision(name, shape, density, DENSE, reason=f"density {density:.0%} > {config.max_density:.0%}"), None
    if config.policy == "always":
        fmt = rule_format(mask, config.formats)
        return LayerDecision(name, shape, density, fmt, reason="policy always"), candidate_weights(mask, values, (fmt,))[fmt]
    probe = torch.zeros(1, shape[1])
    weights = {fmt: w for fmt, w in candidate_weights(mask, values, config.formats).items()
               if config.backend == "torch" or kernel_name(w, probe, config.backend) != "torch"}
    if not weights:
        return LayerDecision(name, shape, density, DENSE, reason="no compiled kernel for these formats"), None
    assert cache is not None, "policy 'measure' needs a TimingCache"
    seconds = cache.measure(weights, shape, density, config)
    chosen = choose(seconds, config.min_speedup)
    reason = "fastest" if chosen != DENSE else f"no format {config.min_speedup:.2f}x faster than dense"
    return LayerDecision(name, shape, density, chosen, seconds, reason), weights.get(chosen)
