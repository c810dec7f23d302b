"""Where sparsetorch keeps what it makes once and reuses: converted models, texts, built kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """$SPARSETORCH_CACHE, else $XDG_CACHE_HOME/sparsetorch, else ~/.cache/sparsetorch."""
    if env := os.environ.get("SPARSETORCH_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sparsetorch"
