"""Every kernel against the dense matmul it replaces: each ISA build this CPU runs, and the fallback."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import nm_weight
from sparsetorch.formats.bitmask import BitmaskTensor
from sparsetorch.formats.csr16 import Csr16Tensor
from sparsetorch.formats.nm import NMTensor
from sparsetorch.kernels import build, cpu, cpu_features, dispatch
from sparsetorch.kernels.build import build_dir, load_isa, module_name
from sparsetorch.kernels.cpu_features import supported_isas
from sparsetorch.kernels.dispatch import bind_kernel, kernel_name
from sparsetorch.kernels.registry import KernelRegistry
from sparsetorch.models.ops import MODEL_OPS

BACKENDS = [*supported_isas(), "torch"]
SHAPES = [(37, 64), (40, 100), (130, 516), (8, 4)]
# (batch rows, OUTER_FROM): the rows regime runs below OUTER_FROM rows (at most 8), the outer one from there
REGIMES = [(1, 2), (3, 9), (8, 9), (3, 2), (8, 2), (9, 2), (20, 2), (40, 2), (300, 2)]


def make_weight(fmt: str, rows: int, cols: int):
    if fmt == "nm":
        return NMTensor.from_dense(nm_weight(rows, cols, 2, 4), 2, 4)
    dense = torch.randn(rows, cols) * (torch.rand(rows, cols) > 0.7)
    return (BitmaskTensor if fmt == "bitmask" else Csr16Tensor).from_dense(dense)


def assert_matches_dense(y: torch.Tensor, reference: torch.Tensor) -> None:
    """Max abs error within 1e-4 of the output's scale (fp32; only the summation order differs)."""
    assert y.shape == reference.shape and y.dtype == reference.dtype
    scale = reference.abs().max().clamp_min(1e-6)
    assert float((y - reference).abs().max()) <= 1e-4 * float(scale)


def require(backend: str) -> None:
    if backend != "torch" and load_isa(backend) is None:
        pytest.skip(f"the {backend} C++ kernels could not be built here (no compiler?)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["nm", "bitmask", "csr16"])
@pytest.mark.parametrize("batch,outer_from", REGIMES, ids=[f"b{b}-{'outer' if b >= o else 'rows'}" for b, o in REGIMES])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
def test_kernel_matches_dense_masked(backend, fmt, batch, outer_from, shape, monkeypatch):
    require(backend)
    monkeypatch.setattr(cpu, "OUTER_FROM", outer_from)
    weight = make_weight(fmt, *shape)
    x, bias = torch.randn(batch, shape[1]), torch.randn(shape[0])
    assert kernel_name(weight, x, backend) == backend
    run = bind_kernel(weight, x, backend)
    assert_matches_dense(run(x, bias), F.linear(x, weight.to_dense(), bias))
    assert_matches_dense(run(x, None), F.linear(x, weight.to_dense()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_all_zero_rows(backend):
    require(backend)
    dense = torch.zeros(20, 64)
    dense[3, 5] = 2.0
    for weight in (BitmaskTensor.from_dense(dense), Csr16Tensor.from_dense(dense)):
        run = bind_kernel(weight, torch.zeros(1, 64), backend)
        assert run(torch.zeros(0, 64), None).shape == (0, 20)
        x = torch.randn(2, 64)
        assert_matches_dense(run(x, None), F.linear(x, dense))


def test_fallback_gives_the_same_numbers_as_the_cpp_kernels():
    isa = supported_isas()[0]
    require(isa)
    for fmt in ("nm", "bitmask", "csr16"):
        weight = make_weight(fmt, 96, 128)
        for batch in (1, 5, 64):
            x = torch.randn(batch, 128)
            torch.testing.assert_close(bind_kernel(weight, x, isa)(x, None), bind_kernel(weight, x, "torch")(x, None),
                                       rtol=1e-5, atol=1e-5)


def test_layouts_without_a_cpp_kernel_use_the_fallback():
    one_of_four = NMTensor.from_dense(nm_weight(16, 32, 1, 4), 1, 4)
    x = torch.randn(3, 32)
    assert kernel_name(one_of_four, x) == "torch"
    assert_matches_dense(bind_kernel(one_of_four, x)(x, None), F.linear(x, one_of_four.to_dense()))
    weight = make_weight("bitmask", 16, 32)
    x64 = torch.randn(3, 32, dtype=torch.float64)
    assert kernel_name(weight, x64) == "torch"
    torch.testing.assert_close(bind_kernel(weight, x64)(x64, None), F.linear(x64, weight.to_dense().double()))


def test_unknown_or_unsupported_backend(monkeypatch):
    weight, x = make_weight("bitmask", 4, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match="unknown kernel backend 'sse9'"):
        bind_kernel(weight, x, "sse9")
    monkeypatch.setattr(dispatch, "supported_isas", lambda: ("scalar",))
    with pytest.raises(ValueError, match="cannot run the avx2 kernels; it supports"):
        bind_kernel(weight, x, "avx2")


def test_registry_rejects_duplicates_and_names_what_to_register():
    registry = KernelRegistry("demo")
    registry.register("fmt", "linear")(lambda weight, isa: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("fmt", "linear")(lambda weight, isa: None)
    with pytest.raises(NotImplementedError, match=r"DEMO.register\('other', 'linear'\)"):
        registry.get("other", "linear")


def test_isa_detection_follows_cpu_flags(monkeypatch):
    no_avx512bw = cpu_features.ISA_REQUIREMENTS["avx512"] - {"avx512bw"}
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: no_avx512bw)
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    assert cpu_features.supported_isas.__wrapped__() == ("avx2", "scalar")
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"sse2"}))
    assert cpu_features.supported_isas.__wrapped__() == ("scalar",)
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "aarch64")
    assert cpu_features.supported_isas.__wrapped__() == ("scalar",)


def test_builds_are_keyed_by_isa_and_sources():
    assert module_name("avx2") != module_name("avx512")
    assert module_name("avx2").startswith("sparsetorch_kernels_avx2_") and module_name("avx2") == module_name("avx2")
    models = module_name("avx2", MODEL_OPS)  # the own model's ops: other sources, another module
    assert models.startswith("sparsetorch_models_avx2_") and models.split("_")[-1] != module_name("avx2").split("_")[-1]
    assert build_dir("avx2", MODEL_OPS) != build_dir("avx2")
    assert "-march=native" not in " ".join(flag for flags in cpu_features.ISA_FLAGS.values() for flag in flags)


def test_no_compiler_means_a_warning_and_the_fallback(monkeypatch, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    monkeypatch.setenv("SPARSETORCH_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_compile", no_compiler)
    isa = supported_isas()[0]
    build.load_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build its .* C.. kernels .*command not found"):
            assert build.load_isa(isa) is None
        with pytest.warns(RuntimeWarning, match="could not build its .* C.. models .*command not found"):
            assert build.load_extension(MODEL_OPS, isa) is None
        weight = make_weight("bitmask", 12, 40)
        x = torch.randn(2, 40)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert kernel_name(weight, x) == "torch"
        assert_matches_dense(bind_kernel(weight, x, "torch")(x, None), F.linear(x, weight.to_dense()))
    finally:
        build.load_extension.cache_clear()


def test_a_cache_writable_by_everyone_is_not_trusted(monkeypatch, tmp_path):
    """Another user could plant a library there: sparsetorch builds a private copy instead, and says why."""
    monkeypatch.setenv("SPARSETORCH_CACHE", str(tmp_path))
    isa = supported_isas()[0]
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels").chmod(0o777)
    built = []
    monkeypatch.setattr(build, "_compile", lambda ext, isa, name, directory: built.append(directory) or
                        (directory / f"{name}.so").write_bytes(b"not loaded"))
    with pytest.warns(RuntimeWarning, match="does not load its cached kernels build: .*kernels is writable by every user"):
        library = build._trusted_build(build.KERNELS, isa, module_name(isa), build_dir(isa))
    assert not str(library).startswith(str(tmp_path)) and library.exists()
    assert len(built) == 1


def test_a_damaged_cached_library_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSETORCH_CACHE", str(tmp_path))
    isa = supported_isas()[0]
    builds = []

    def fake_compile(ext, isa, name, directory):
        builds.append(directory)
        (directory / f"{name}.so").write_bytes(b"library v%d" % len(builds))

    monkeypatch.setattr(build, "_compile", fake_compile)
    library = build._trusted_build(build.KERNELS, isa, module_name(isa), build_dir(isa))
    assert library.parent == build_dir(isa) and len(builds) == 1
    assert build._trusted_build(build.KERNELS, isa, module_name(isa), build_dir(isa)) == library and len(builds) == 1
    library.write_bytes(b"planted or truncated")
    with pytest.warns(RuntimeWarning, match="does not match the SHA-256 recorded at its build; rebuilding"):
        build._trusted_build(build.KERNELS, isa, module_name(isa), build_dir(isa))
    assert len(builds) == 2 and library.read_bytes() == b"library v2"
    assert not list(tmp_path.glob("kernels/.*.build-*"))  # staging renamed or removed


def test_group_write_is_trusted_only_for_a_group_of_ones_own(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    cache.mkdir()
    cache.chmod(0o775)
    monkeypatch.setattr(build, "_group_has_others", lambda gid: False)
    assert build._distrust(cache) is None
    monkeypatch.setattr(build, "_group_has_others", lambda gid: True)
    assert build._distrust(cache) == f"{cache} is writable by its group, which has other users"
