"""Sparse matmul kernels: C++ for CPUs (one build per ISA, picked at run time), 2:4 on CUDA,
and pure-PyTorch fallbacks; registries keyed by (format, op) per backend."""

from sparsetorch.kernels.build import load_isa
from sparsetorch.kernels.cpu_features import supported_isas
from sparsetorch.kernels.dispatch import BACKENDS, bind_kernel, kernel_name
from sparsetorch.kernels.registry import CPU, CUDA, TORCH, KernelRegistry

__all__ = ["BACKENDS", "CPU", "CUDA", "TORCH", "KernelRegistry", "bind_kernel", "kernel_name", "load_isa", "supported_isas"]
