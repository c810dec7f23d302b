"""Sparse training in any PyTorch loop: one Sparsifier, every method.

    from sparsetorch.training import RigL, Sparsifier
    sparsifier = Sparsifier(model, RigL(sparsity=0.9, end=3000), distribution="erk", optimizer=opt)
    ...  loss.backward(); opt.step(); sparsifier.step(); opt.zero_grad()

Methods are configs (schedules) with a registered handler each: OneShot (magnitude or
random static masks), Gradual (cubic GMP), Iterative (IMP with rewinding), SET, RigL,
SRigL, SRSTE and ProgressiveNM (N:M from scratch). `average` and `greedy_soup` make sparse model soups.
`recover` trains a one-shot-pruned LLM back towards its dense model, masks fixed.
"""

from sparsetorch.training.distributions import DISTRIBUTIONS, layer_sparsities, register_distribution
from sparsetorch.training.dynamic import SET, DynamicSchedule, RigL
from sparsetorch.training.method import METHODS, Layer, MaskUpdate, Method, Schedule, register_method, schedule_from_dict
from sparsetorch.training.nm import SRSTE, ProgressiveNM
from sparsetorch.training.recover import RecoverConfig, RecoverReport, recover
from sparsetorch.training.schedules import Gradual, Iterative, OneShot
from sparsetorch.training.soups import GreedySoup, average, greedy_soup, shared_masks
from sparsetorch.training.sparsifier import Sparsifier
from sparsetorch.training.srigl import SRigL

__all__ = [
    "DISTRIBUTIONS",
    "METHODS",
    "SET",
    "SRSTE",
    "DynamicSchedule",
    "GreedySoup",
    "Gradual",
    "Iterative",
    "Layer",
    "MaskUpdate",
    "Method",
    "OneShot",
    "ProgressiveNM",
    "RecoverConfig",
    "RecoverReport",
    "RigL",
    "SRigL",
    "Schedule",
    "Sparsifier",
    "average",
    "greedy_soup",
    "layer_sparsities",
    "recover",
    "register_distribution",
    "register_method",
    "schedule_from_dict",
    "shared_masks",
]
