"""Shared by the benchmark scripts: the machine line, and appending a section to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    """CPU model, cores, OS, torch version and threads, and the load average when the run began."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average {load:.2f} at start")


def header(title: str, script: str) -> list[str]:
    """The first lines of a section: title with the date, the exact command, the machine."""
    command = " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]])
    return [f"## {title} ({datetime.date.today()})", "", f"Command: `{command}`  ", f"Machine: {machine()}", ""]


def publish(lines: list[str], append: bool = True) -> None:
    """Print a markdown section and (unless `append` is False) append it to benchmarks/RESULTS.md."""
    section = "\n".join(lines)
    print(section)
    if append:
        with open(RESULTS, "a") as f:
            f.write(("\n" if RESULTS.exists() and RESULTS.stat().st_size else "# Benchmark results\n\n") + section + "\n")
