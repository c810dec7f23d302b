"""One writer per output: an exclusive lock on `<out>.lock`, held for a whole run.

Two runs writing one output at once would leave a mix of both (the second would pick up the first's
live resume checkpoint). The lock is an `fcntl` lock on a file beside the output, so the operating
system releases it when its process ends, however it ends: a lock file left by a dead run is never
mistaken for a live one. The file records the holder's pid for the message the loser gets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputBusyError", "output_lock"]


class OutputBusyError(RuntimeError):
    """Another process holds the lock on this output."""


@contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of output `out` for the context; yield the lock file's path.

    Raises:
        OutputBusyError: another live process holds it (the message names its pid).

    Example:
        >>> with output_lock("pruned/smollm2-24"):
        ...     prune_and_save()
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield Path(f"{out}.lock")
        return
    path = Path(f"{out}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise OutputBusyError(f"another sparsetorch run (pid {holder}) is writing {out}; wait for it to finish "
                                  "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
