"""runtime.compile and load_sparse_model: decisions by a deterministic timer, never by real timing."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.formats.checkpoint import CorruptFileError
from sparsetorch.formats.pruned import load_pruned, save_pruned
from sparsetorch.nn import SparseLinear
from sparsetorch.runtime import MedianTimer, RuntimeConfig, Trial, choose, compile, load_sparse_model


def fixed_timer(seconds: dict[str, float], per_batch: dict[tuple[str, int], float] | None = None):
    """A Timer that answers from a table (by kind, or by (kind, batch)) and records what it was asked."""
    asked = []

    def timer(runs):
        asked.append(list(runs))
        return {t: (per_batch or {}).get((t.kind, t.batch), seconds.get(t.kind, 1.0)) for t in runs}

    timer.asked = asked
    return timer


SPARSE_WINS = {"dense": 1.0, "nm": 0.5, "bitmask": 0.6, "csr16": 0.7}
DENSE_WINS = {"dense": 1.0, "nm": 1.2, "bitmask": 1.5, "csr16": 1.1}


@pytest.fixture(scope="module")
def pruned_models():
    """The tiny Llama pruned 2:4 and 50% unstructured, with its logits on fixed ids."""
    torch.manual_seed(0)
    ids = calibration_ids(windows=1)
    models = {}
    for pattern, sparsity in (("2:4", None), ("unstructured", 0.5)):
        model = tiny_llama(vocab=160, intermediate=96)  # no other tensor has a pruned layer's shape
        report = sparsetorch.prune(model, calibration_ids(), method="wanda", pattern=pattern, sparsity=sparsity)
        with torch.no_grad():
            models[pattern] = (model, report, model(ids).logits)
    return models, ids


@pytest.fixture(scope="module")
def pruned_dirs(pruned_models, tmp_path_factory):
    models, _ = pruned_models
    root = tmp_path_factory.mktemp("pruned")
    return {pattern: save_pruned(model, root / pattern.replace(":", "of"), report.to_dict())
            for pattern, (model, report, _) in models.items()}


def test_choose_needs_a_win_at_every_batch_size():
    assert choose({"dense": {1: 1.0}, "nm": {1: 0.6}, "bitmask": {1: 0.5}}, 1.05) == "bitmask"
    assert choose({"dense": {1: 1.0}, "nm": {1: 0.97}}, 1.05) == "dense"
    mixed = {"dense": {1: 1.0, 512: 1.0}, "nm": {1: 0.5, 512: 1.2}, "csr16": {1: 0.9, 512: 0.9}}
    assert choose(mixed, 1.05) == "csr16"
    assert choose({**mixed, "csr16": {1: 0.9, 512: 1.01}}, 1.05) == "dense"


def test_config_validates_and_round_trips():
    config = RuntimeConfig(batch_sizes=(1, 512), formats=("nm", "csr16"))
    assert RuntimeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        RuntimeConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match=r"unknown formats \['coo'\]"):
        RuntimeConfig(formats=("coo",))
    with pytest.raises(ValueError, match="policy must be one of"):
        RuntimeConfig(policy="sometimes")


@pytest.mark.parametrize("pattern,expected", [("2:4", "nm"), ("unstructured", "bitmask")])
def test_compile_swaps_layers_where_sparse_measures_faster(pruned_models, pattern, expected):
    (models, ids) = pruned_models
    model, _, logits = models[pattern]
    model = copy.deepcopy(model)
    timer = fixed_timer(SPARSE_WINS)
    report = compile(model, RuntimeConfig(), timer=timer)
    assert len(report.replaced) == 14 and report.summary() == f"14 of 14 layers sparse ({expected}: 14)"
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    assert isinstance(model.lm_head, nn.Linear)
    assert len(timer.asked) == 4  # one measurement per distinct (shape, density), shared by alike layers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert "| 96×64 |" in report.table() and f"| {expected} |" in report.table()


def test_compile_keeps_dense_where_dense_is_faster(pruned_models):
    (models, _) = pruned_models
    model = copy.deepcopy(models["2:4"][0])
    before = dict(model.named_modules())
    report = compile(model, RuntimeConfig(), timer=fixed_timer(DENSE_WINS))
    assert report.replaced == [] and all(d.chosen == "dense" for d in report.decisions)
    assert dict(model.named_modules()) == before


def test_compile_at_two_batch_sizes_falls_back_where_either_loses(pruned_models):
    (models, _) = pruned_models
    model = copy.deepcopy(models["2:4"][0])
    slow_prefill = {(kind, 512): 2.0 for kind in ("nm", "bitmask", "csr16")}
    timer = fixed_timer(SPARSE_WINS, slow_prefill)
    report = compile(model, RuntimeConfig(batch_sizes=(1, 512)), timer=timer)
    assert report.replaced == []
    assert {t.batch for trials in timer.asked for t in trials} == {1, 512}


def test_too_dense_layers_are_not_measured():
    model = nn.Sequential(nn.Linear(16, 16))
    timer = fixed_timer(SPARSE_WINS)
    report = compile(model, RuntimeConfig(targets=("Linear",), ignore=()), timer=timer)
    assert report.decisions[0].chosen == "dense" and "density 100%" in report.decisions[0].reason
    assert timer.asked == []


def test_median_timer_interleaves_and_returns_one_median_per_trial():
    order = []
    runs = {Trial(kind, (4, 4), 1, 1.0): (lambda kind=kind: order.append(kind)) for kind in ("dense", "nm")}
    seconds = MedianTimer(budget_s=0.0, min_repeats=3, max_repeats=3, flush_bytes=1 << 16)(runs)
    assert set(seconds) == set(runs) and all(s >= 0 for s in seconds.values())
    assert order == ["dense", "nm"] * 4  # a warm-up turn, then three alternating turns


class FullShapeFloats(TorchDispatchMode):
    """Records every floating-point tensor an op creates, off the meta device, whose shape is one of `shapes`."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.seen = set(shapes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and tuple(t.shape) in self.shapes:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_loading_from_the_compressed_dir_never_builds_a_dense_weight(pruned_models, pruned_dirs, pattern):
    (models, ids) = pruned_models
    model, report, logits = models[pattern]
    shapes = {tuple(m.weight.shape) for name, m in model.named_modules() if name in report.layers}
    with FullShapeFloats(shapes) as mode:
        loaded, load_report = load_sparse_model(pruned_dirs[pattern], RuntimeConfig(policy="always"))
    assert mode.seen == []
    assert len(load_report.replaced) == len(report.layers) == 14
    assert [name for name, m in loaded.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_loading_keeps_dense_the_layers_that_lose(pruned_models, pruned_dirs):
    (models, ids) = pruned_models
    loaded, report = load_sparse_model(pruned_dirs["2:4"], RuntimeConfig(), timer=fixed_timer(DENSE_WINS))
    assert report.replaced == []
    assert not any(isinstance(m, SparseLinear) for m in loaded.modules())
    dense = load_pruned(pruned_dirs["2:4"])
    for (name, a), b in zip(loaded.state_dict().items(), dense.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, models["2:4"][2], rtol=1e-4, atol=1e-4)


def test_a_damaged_compressed_file_is_detected(pruned_dirs, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(pruned_dirs["2:4"], copy_dir)
    weights = copy_dir / "compressed" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="SHA-256"):
        load_sparse_model(copy_dir, RuntimeConfig(policy="always"))
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        load_sparse_model(tmp_path, RuntimeConfig(policy="always"))


def test_a_sparse_layer_tied_to_the_embedding_loads_as_one_dense_tensor(tmp_path):
    model = tiny_llama(tie=True)
    report = sparsetorch.prune(model, calibration_ids(), method="magnitude", ignore=(), progress=False)
    out = save_pruned(model, tmp_path / "out", report.to_dict())
    loaded, compiled = load_sparse_model(out, RuntimeConfig(policy="always"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    reasons = {d.name: d.reason for d in compiled.decisions}
    assert reasons["lm_head"] == "tied to another parameter"
    ids = calibration_ids()[:2]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
