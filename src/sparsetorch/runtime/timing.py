"""Timing dense and sparse kernels against each other: interleaved, cold caches, medians.

A decode step streams every layer's weights from memory, so a layer is timed with the caches
flushed before each call (otherwise a small layer would sit in the last-level cache and
measure far faster than it runs in a model). Alternatives are timed in turns, so slow drifts
of the machine hit them alike, and the median of the turns is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["MedianTimer", "Timer", "Trial", "last_level_cache_bytes"]

_DEFAULT_CACHE_BYTES = 32 << 20


@dataclass(frozen=True)
class Trial:
    """One thing to time: `kind` ('dense' or a format) for a weight shape, batch size and density."""

    kind: str
    shape: tuple[int, int]
    batch: int
    density: float


Timer = Callable[[dict[Trial, Callable[[], object]]], dict[Trial, float]]  # runs -> median seconds


def last_level_cache_bytes() -> int:
    """Size of CPU 0's largest cache level (Linux sysfs), or 32 MiB where it is not reported."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, text = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes[level] = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    return sizes[max(sizes)] if sizes else _DEFAULT_CACHE_BYTES


class MedianTimer:
    """The default `Timer`: interleaved turns, caches flushed before each call, median seconds.

    Args:
        budget_s: about how long to spend on one set of alternatives.
        min_repeats / max_repeats: bounds on the number of turns.
        flush_bytes: size of the buffer read to flush caches (0: no flushing; default: twice the
            last-level cache). It lives as long as the timer.
    """

    def __init__(self, budget_s: float = 0.3, min_repeats: int = 5, max_repeats: int = 25,
                 flush_bytes: int | None = None) -> None:
        self.budget_s, self.min_repeats, self.max_repeats = budget_s, min_repeats, max_repeats
        flush_bytes = 2 * last_level_cache_bytes() if flush_bytes is None else flush_bytes
        self._flush = torch.ones(flush_bytes // 4) if flush_bytes else None

    def _cold(self) -> None:
        if self._flush is not None:
            self._flush.sum()

    def __call__(self, runs: dict[Trial, Callable[[], object]]) -> dict[Trial, float]:
        seconds: dict[Trial, list[float]] = {trial: [] for trial in runs}
        for run in runs.values():  # warm-up: builds, first touches, thread start
            run()
        for turn in range(self.max_repeats):
            for trial, run in runs.items():
                self._cold()
                started = time.perf_counter()
                run()
                seconds[trial].append(time.perf_counter() - started)
            spent = sum(sum(s) for s in seconds.values())
            if turn + 1 >= self.min_repeats and spent >= self.budget_s:
                break
        return {trial: statistics.median(s) for trial, s in seconds.items()}
