"""Keeping freed memory out of the resident set (glibc only; a no-op elsewhere).

Loading a sparse model decodes one layer at a time: temporaries of a few MB are made and
dropped between the tensors that stay. glibc keeps freed heap pages, and after the first
large free it raises its mmap threshold from 128 KiB (up to 32 MiB), so later buffers of
hundreds of KB to MBs (decoded layers, each decode's KV cache) come from the heap too, and the
heap grows with fragments of them. `give_back_free_memory` trims the heap once;
`fix_mmap_threshold` keeps the threshold at glibc's initial 128 KiB, so every larger buffer is
its own mapping and goes back to the OS when freed, so a process's peak resident set stays
that of one decode rather than growing with every repeat (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["fix_mmap_threshold", "give_back_free_memory"]

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (not glibc: musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


def give_back_free_memory() -> None:
    """Return the heap's free pages to the OS now."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def fix_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Serve every allocation above `threshold` bytes by its own mapping, for the rest of the
    process. A process-wide setting: the bench workers and the CLI call it, the library never
    does on its own.

    Returns:
        whether the setting took (False off glibc).
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
