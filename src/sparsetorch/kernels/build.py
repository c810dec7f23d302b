"""Build sparsetorch's C++ op libraries on first use, once per ISA, into the user cache.

Two libraries (`Extension`s): the sparse matmul kernels and solver ops of `kernels/csrc`, and
the own model path's ops of `models/csrc`. Each ISA gets its own module of each, compiled from
the same sources with that ISA's explicit flags (`cpu_features.ISA_FLAGS`, never `-march=native`)
and a name that carries the hash of the sources, the flags and the torch version, so a stale
build is never loaded. An exclusive file lock keeps two processes from building the same module
at once. Without a working compiler the build fails once, with a warning, and the pure-PyTorch
code serves.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetorch.cache import cache_dir
from sparsetorch.kernels.cpu_features import ISA_FLAGS, supported_isas

__all__ = ["CSRC", "KERNELS", "Extension", "best_loaded_isa", "best_ops", "build_dir", "load_extension", "load_isa",
           "module_name"]

CSRC = Path(__file__).parent / "csrc"
# -fopenmp compiles at::parallel_for's pragmas (without it the kernels run on one thread); it is not
# passed to the link, so the module uses the OpenMP runtime libtorch_cpu already loaded, and its threads.
_COMMON_FLAGS: tuple[str, ...] = ("-O3", "-fno-math-errno", "-fopenmp", "-Wall")
_DEFINE = {"avx512": "-DST_ISA_AVX512", "avx2": "-DST_ISA_AVX2", "scalar": "-DST_ISA_SCALAR"}


@dataclass(frozen=True)
class Extension:
    """A library of torch ops compiled from one folder of C++ sources (`ops.cpp` and its headers).

    `kind` names it in the module name: 'kernels' (sparse matmuls and solver ops, here) or
    'models' (the own model path's ops, `sparsetorch/models/csrc`).
    """

    kind: str
    csrc: Path

    def sources(self) -> list[Path]:
        return sorted(p for p in self.csrc.iterdir() if p.suffix in (".cpp", ".h"))


KERNELS = Extension("kernels", CSRC)


def module_name(isa: str, extension: Extension = KERNELS) -> str:
    """`sparsetorch_<kind>_<isa>_<hash>`: the hash covers the sources, flags and torch version."""
    digest = hashlib.sha256()
    for path in extension.sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join((*_COMMON_FLAGS, *ISA_FLAGS[isa], torch.__version__)).encode())
    return f"sparsetorch_{extension.kind}_{isa}_{digest.hexdigest()[:12]}"


def build_dir(isa: str, extension: Extension = KERNELS) -> Path:
    return cache_dir() / "kernels" / module_name(isa, extension)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (released by the OS even if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, a concurrent build may simply repeat the work
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(extension: Extension, isa: str, name: str, directory: Path) -> None:
    from torch.utils.cpp_extension import load  # pulls in setuptools: only when a build is needed

    directory.mkdir(parents=True, exist_ok=True)
    flags = [*_COMMON_FLAGS, *ISA_FLAGS[isa], _DEFINE[isa], f"-DST_NAMESPACE={name}"]
    load(name=name, sources=[str(extension.csrc / "ops.cpp")], extra_cflags=flags, build_directory=str(directory),
         is_python_module=False, verbose=bool(os.environ.get("SPARSETORCH_VERBOSE_BUILD")))


@functools.cache
def load_extension(extension: Extension, isa: str):
    """The torch.ops namespace of `extension` built for `isa`, building it on first use.

    Returns:
        `torch.ops.<module_name(isa, extension)>`, which always has an `isa` op; or None (after
        one warning) when this CPU lacks the ISA or no compiler works.
    """
    if isa not in supported_isas():
        return None
    name = module_name(isa, extension)
    directory = build_dir(isa, extension)
    library = directory / f"{name}.so"
    try:
        if not library.exists():
            with _exclusive(directory.parent / f"{name}.lock"):
                if not library.exists():
                    _compile(extension, isa, name, directory)
        if not hasattr(getattr(torch.ops, name), "isa"):
            torch.ops.load_library(str(library))
    except Exception as err:  # no compiler, no ninja, a failed build: all mean "use the fallback"
        warnings.warn(
            f"sparsetorch could not build its {isa} C++ {extension.kind} ({type(err).__name__}: {str(err)[:300]}); "
            "the slower pure-PyTorch code serves instead. Install g++ and ninja to get the fast one.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return getattr(torch.ops, name)


def load_isa(isa: str):
    """The sparse matmul kernels and solver ops built for `isa` (see `load_extension`).

    Example:
        >>> ops = load_isa("avx2")
        >>> y = ops.nm24_linear(x, values, indices, None, in_features, 9)
    """
    return load_extension(KERNELS, isa)


def best_loaded_isa(isas: tuple[str, ...] | None = None, extension: Extension = KERNELS) -> str | None:
    """The first of `isas` (default: every ISA this CPU runs, best first) whose build loads, or None."""
    candidates = supported_isas() if isas is None else isas
    return next((isa for isa in candidates if load_extension(extension, isa) is not None), None)


@functools.cache
def best_ops(extension: Extension = KERNELS):
    """The torch.ops namespace of `extension` for the best ISA that loads, or None without a compiler."""
    isa = best_loaded_isa(extension=extension)
    return None if isa is None else load_extension(extension, isa)
