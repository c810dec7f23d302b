"""sparsetorch: make PyTorch models sparse, and make the sparsity pay."""

from sparsetorch.oneshot import PruneConfig, PruneReport, prune
from sparsetorch.patterns import NM, Block, Pattern, Unstructured, parse_pattern
from sparsetorch.training import Sparsifier

__version__ = "0.1.0"

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
]
