"""`compile(model)`: swap each eligible Linear for a SparseLinear where that measures faster."""

from __future__ import annotations

from torch import nn

from sparsetorch.nn import SparseLinear
from sparsetorch.runtime.config import RuntimeConfig
from sparsetorch.runtime.decide import TimingCache, decide_layer
from sparsetorch.runtime.report import CompileReport
from sparsetorch.runtime.timing import MedianTimer, Timer
from sparsetorch.targets import find_targets, weight_matrix

__all__ = ["compile"]


def compile(model: nn.Module, config: RuntimeConfig | None = None, timer: Timer | None = None) -> CompileReport:
    """Replace, in place, each targeted Linear whose sparse kernel beats dense by a SparseLinear.

    Every layer is timed dense and in each candidate format at `config.batch_sizes` (caches
    flushed, interleaved, medians; alike layers share one measurement), and goes sparse only if
    one format is `config.min_speedup` times faster at every batch size. Layers that lose, or
    are too dense, stay exactly as they were.

    Args:
        model: a model whose pruned Linear layers hold zeros.
        config: what to try (default `RuntimeConfig()`: decode, batch size 1).
        timer: how to time (default `MedianTimer()`); tests pass a deterministic one.

    Returns:
        A CompileReport with each layer's decision and timings.

    Raises:
        ValueError: the targets match no Linear layer.

    Example:
        >>> report = sparsetorch.runtime.compile(model, RuntimeConfig(batch_sizes=(1,)))
        >>> print(report.summary())
    """
    config = config or RuntimeConfig()
    cache = TimingCache(timer or MedianTimer()) if config.policy == "measure" else None
    decisions = []
    for name, module in find_targets(model, config.targets, config.ignore).items():
        dense = weight_matrix(module)
        mask = dense != 0
        decision, weight = decide_layer(name, mask, dense[mask], config, cache)
        if weight is not None:
            bias = getattr(module, "bias", None)
            model.set_submodule(name, SparseLinear(weight, None if bias is None else bias.detach(), config.backend))
        decisions.append(decision)
    return CompileReport(tuple(decisions), config)
