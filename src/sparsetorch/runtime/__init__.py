"""Run pruned models fast: swap Linear layers for SparseLinear where the kernels measure faster,
load pruned models straight from their compressed form, and run Llama-family models in a lean
decoder that needs no transformers."""

from sparsetorch.models.llama import LeanConfig, LeanLlama
from sparsetorch.runtime.compile import compile
from sparsetorch.runtime.config import POLICIES, RuntimeConfig
from sparsetorch.runtime.decide import LayerDecision, choose
from sparsetorch.runtime.fuse import fuse_projections
from sparsetorch.runtime.lean import load_lean_model
from sparsetorch.runtime.loader import load_sparse_model
from sparsetorch.runtime.report import CompileReport
from sparsetorch.runtime.timing import MedianTimer, Trial

__all__ = [
    "POLICIES",
    "CompileReport",
    "LayerDecision",
    "LeanConfig",
    "LeanLlama",
    "MedianTimer",
    "RuntimeConfig",
    "Trial",
    "choose",
    "compile",
    "fuse_projections",
    "load_lean_model",
    "load_sparse_model",
]
