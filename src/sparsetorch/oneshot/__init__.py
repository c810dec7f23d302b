"""One-shot (post-training) pruning with calibration data."""

from sparsetorch.oneshot.calibrate import LAYER_INPUTS, BlockWork, DenseInputs, register_layer_inputs
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.lockstep import MixedInputs, PrunedInputs
from sparsetorch.oneshot.pipeline import prune
from sparsetorch.oneshot.report import LayerReport, PruneReport
from sparsetorch.oneshot.solvers import SOLVERS, Solver, SolverOptions, get_solver, register_solver
from sparsetorch.oneshot.sparsegpt import sparsegpt_prune, sparsegpt_quantize_many
from sparsetorch.oneshot.stats import Gram, InputSqNorms, Statistic
from sparsetorch.oneshot.streaming import prune_directory

__all__ = [
    "LAYER_INPUTS",
    "SOLVERS",
    "BlockWork",
    "DenseInputs",
    "Gram",
    "InputSqNorms",
    "LayerReport",
    "MixedInputs",
    "PruneConfig",
    "PruneReport",
    "PrunedInputs",
    "Solver",
    "SolverOptions",
    "Statistic",
    "get_solver",
    "prune",
    "prune_directory",
    "register_layer_inputs",
    "register_solver",
    "sparsegpt_prune",
    "sparsegpt_quantize_many",
]
