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
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsetorch.cache import cache_dir
from sparsetorch.formats.checkpoint import sha256_file
from sparsetorch.kernels.cpu_features import ISA_FLAGS, supported_isas

__all__ = ["CSRC", "KERNELS", "Extension", "best_loaded_isa", "best_ops", "build_dir", "load_extension", "load_isa",
           "module_name"]

CSRC = Path(__file__).parent / "csrc"
# -fopenmp compiles at::parallel_for's pragmas (without it the kernels run on one thread); it is not
# passed to the link, so the module uses the OpenMP runtime libtorch_cpu already loaded, and its threads.
_COMMON_FLAGS: tuple[str, ...] = ("-O3", "-fno-math-errno", "-fopenmp", "-Wall")
_DEFINES: dict[str, tuple[str, ...]] = {
    "avx512vnni": ("-DST_ISA_AVX512", "-DST_ISA_AVX512VNNI"),  # the avx512 code, plus int8-activation kernels
    "avx512": ("-DST_ISA_AVX512",),
    "avx2": ("-DST_ISA_AVX2",),
    "scalar": ("-DST_ISA_SCALAR",),
}


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


def _distrust(*paths: Path) -> str | None:
    """Why a cached build at these paths must not be loaded (another user's, or writable by anyone), or None."""
    for path in paths:
        if not path.exists():
            continue
        info = path.stat()
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            return f"{path} belongs to another user"
        if info.st_mode & stat.S_IWOTH:
            return f"{path} is writable by every user"
        if info.st_mode & stat.S_IWGRP and _group_has_others(info.st_gid):
            return f"{path} is writable by its group, which has other users"
    return None


def _group_has_others(gid: int) -> bool:
    """Whether a user other than this one belongs to group `gid` (as a member or by primary group)."""
    try:
        import grp
        import pwd
    except ImportError:
        return False
    me = pwd.getpwuid(os.getuid()).pw_name
    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return True  # an unnamed group: nothing says it is ours alone
    members |= {user.pw_name for user in pwd.getpwall() if user.pw_gid == gid}
    return bool(members - {me})


def _recorded_sha256(library: Path) -> str | None:
    """The SHA-256 recorded when `library` was built (None: not built, or built by an older sparsetorch)."""
    recorded = library.with_name(library.name + ".sha256")
    return recorded.read_text().strip() if library.exists() and recorded.exists() else None


def _build(extension: Extension, isa: str, name: str, directory: Path) -> None:
    """Compile in a private staging directory beside `directory`, record the library's SHA-256, and
    rename it into place: `directory` never holds half a build."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=directory.parent))
    try:
        _compile(extension, isa, name, staging)
        library = staging / f"{name}.so"
        library.with_name(library.name + ".sha256").write_text(sha256_file(library))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compile(extension: Extension, isa: str, name: str, directory: Path) -> None:
    from torch.utils.cpp_extension import load  # pulls in setuptools: only when a build is needed

    directory.mkdir(parents=True, exist_ok=True)
    flags = [*_COMMON_FLAGS, *ISA_FLAGS[isa], *_DEFINES[isa], f"-DST_NAMESPACE={name}"]
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
    try:
        library = _trusted_build(extension, isa, name, directory)
        if not hasattr(getattr(torch.ops, name), "isa"):  # a fresh build was loaded by its compile already
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


def _trusted_build(extension: Extension, isa: str, name: str, directory: Path) -> Path:
    """The path of a build of `name` this process may load: the cached one if it is this user's, writable by
    no one else and intact (rebuilt if damaged), else a fresh build in a private directory, with a warning."""
    library = directory / f"{name}.so"
    problem = _distrust(directory.parent, directory, library)
    if problem is not None:
        warnings.warn(f"sparsetorch does not load its cached {extension.kind} build: {problem}; building a "
                      "private copy for this process (set SPARSETORCH_CACHE to a directory of your own)",
                      RuntimeWarning, stacklevel=4)
        private = Path(tempfile.mkdtemp(prefix="sparsetorch-build-")) / name
        _build(extension, isa, name, private)
        return private / f"{name}.so"
    with _exclusive(directory.parent / f"{name}.lock"):
        recorded = _recorded_sha256(library)
        if recorded is None or recorded != sha256_file(library):
            if recorded is not None:
                warnings.warn(f"{library} does not match the SHA-256 recorded at its build; rebuilding it",
                              RuntimeWarning, stacklevel=4)
            _build(extension, isa, name, directory)
    return library


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
