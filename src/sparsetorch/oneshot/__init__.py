"""One-shot (post-training) pruning with calibration data."""

from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.pipeline import prune
from sparsetorch.oneshot.report import LayerReport, PruneReport
from sparsetorch.oneshot.solvers import SOLVERS, Solver, SolverOptions, get_solver, register_solver
from sparsetorch.oneshot.sparsegpt import sparsegpt_prune
from sparsetorch.oneshot.stats import Gram, InputSqNorms, Statistic

__all__ = [
    "SOLVERS",
    "Gram",
    "InputSqNorms",
    "LayerReport",
    "PruneConfig",
    "PruneReport",
    "Solver",
    "SolverOptions",
    "Statistic",
    "get_solver",
    "prune",
    "register_solver",
    "sparsegpt_prune",
]
