"""Run pruned models fast: swap Linear layers for SparseLinear where the kernels measure faster,
and load pruned models straight from their compressed form."""

from sparsetorch.runtime.compile import compile
from sparsetorch.runtime.config import POLICIES, RuntimeConfig
from sparsetorch.runtime.decide import LayerDecision, choose
from sparsetorch.runtime.loader import load_sparse_model
from sparsetorch.runtime.report import CompileReport
from sparsetorch.runtime.timing import MedianTimer, Trial

__all__ = [
    "POLICIES",
    "CompileReport",
    "LayerDecision",
    "MedianTimer",
    "RuntimeConfig",
    "Trial",
    "choose",
    "compile",
    "load_sparse_model",
]
