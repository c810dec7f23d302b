"""sparsetorch: make PyTorch models sparse, and make the sparsity pay.

The names below load on first use (PEP 562), so importing one layer (`sparsetorch.formats`, say)
never loads the others: storage and kernels do not depend on the pruning methods.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "NM": "sparsetorch.patterns",
    "Block": "sparsetorch.patterns",
    "Pattern": "sparsetorch.patterns",
    "Unstructured": "sparsetorch.patterns",
    "parse_pattern": "sparsetorch.patterns",
    "PruneConfig": "sparsetorch.oneshot",
    "PruneReport": "sparsetorch.oneshot",
    "prune": "sparsetorch.oneshot",
    "prune_directory": "sparsetorch.oneshot",
    "Sparsifier": "sparsetorch.training",
    "recover": "sparsetorch.training",
}

__all__ = [
    "NM",
    "Block",
    "Pattern",
    "PruneConfig",
    "PruneReport",
    "Sparsifier",
    "Unstructured",
    "__version__",
    "parse_pattern",
    "prune",
    "prune_directory",
    "recover",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsetorch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
