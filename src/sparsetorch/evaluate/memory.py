"""Peak resident memory of this process, its own only.

`getrusage(RUSAGE_SELF).ru_maxrss` is the wrong tool in a worker process: Linux carries the
parent's peak over fork and exec, so a child started by a big parent reports the parent's
peak. `VmHWM` in /proc/self/status belongs to the process's own address space, which exec
makes afresh; other systems fall back to ru_maxrss.
"""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """The highest resident set size this process has had, in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
