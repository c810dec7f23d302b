"""Joint pruning + quantization (`PruneConfig.quantize`): SparseGPT's joint sweep against prune-then-round,
every weight on its grid for every method and pattern, the record, resume and the command line."""

import copy
import inspect
import json
from dataclasses import replace

import pytest
import torch

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot import sparsegpt
from sparsetorch.oneshot.config import PruneConfig
from sparsetorch.oneshot.joint import SweepGrids, sweep_joint, sweep_joint_with_op
from sparsetorch.oneshot.resume import DamagedCheckpointError, ResumeCheckpoint
from sparsetorch.oneshot.sparsegpt import (
    inverse_hessian_factor,
    joint_sweep_op,
    sparsegpt_prune_many,
    sparsegpt_quantize_many,
)
from sparsetorch.patterns import NM, Unstructured
from sparsetorch.quantize import QuantScheme, dequantize, fake_quantize, find_grid, quantize
from sparsetorch.targets import weight_matrix

INT8, INT4_G32 = QuantScheme(bits=8), QuantScheme(bits=4, group_size=32)


def _layer(seed: int, rows: int = 64, cols: int = 128, tokens: int = 1024):
    """A random weight and correlated inputs: a few shared directions dominate, columns of uneven scale."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(tokens, 16, generator=g) @ torch.randn(16, cols, generator=g)
    X = (shared + 0.3 * torch.randn(tokens, cols, generator=g)) * (torch.rand(cols, generator=g) * 4 + 0.1)
    return torch.randn(rows, cols, generator=g), X


def _output_error(W, approx, X) -> float:
    return float(((W - approx) @ X.t()).norm())


def _assert_on_grid(weight, keep, grid, where=""):
    assert torch.equal(dequantize(quantize(weight, grid), grid) * keep, weight), where
    assert not weight[~keep].any() and not torch.signbit(weight[~keep]).any(), where  # pruned: +0.0


# ---- config -----------------------------------------------------------------------------


def test_config_names_the_scheme_and_round_trips():
    assert PruneConfig().quantize is None and PruneConfig().scheme is None
    assert PruneConfig(quantize="int8").scheme == QuantScheme(bits=8)  # one scale per output channel
    assert PruneConfig(quantize="int4").scheme == QuantScheme(bits=4, group_size=128)
    assert PruneConfig(quantize="int4", group_size=64).quantize == "int4-g64"
    config = PruneConfig(method="sparsegpt", quantize="INT4-g32-asym")
    assert config.quantize == "int4-g32-asym" and config.group_size == 32
    assert config.scheme == QuantScheme(bits=4, group_size=32, symmetric=False)
    assert PruneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.joint_quantization and not PruneConfig(method="wanda", quantize="int8").joint_quantization
    searched = PruneConfig(quantize="int4", clip_search=True)
    assert searched.scheme == QuantScheme(bits=4, group_size=128) and searched.quantize == "int4-g128"
    assert searched.scheme.search and not PruneConfig(quantize="int4", clip_search=False).scheme.search
    # the default: searched for 4-bit grids, full range for int8 (what measured better on both texts)
    assert PruneConfig(quantize="int4").clip_search and PruneConfig(quantize="int4-g32-asym").scheme.search
    assert not PruneConfig(quantize="int8").clip_search and PruneConfig().clip_search is False


@pytest.mark.parametrize("options,message", [
    (dict(quantize="int3"), r"quantize='int3': bits must be 8 or 4, got 3"),
    (dict(quantize="fp8"), r"quantize='fp8': unknown quantization 'fp8'; use int8, int4"),
    (dict(quantize=4), r"quantize must be None or a name such as 'int8'.*got 4"),
    (dict(quantize="int4", group_size=1), r"group_size must be an integer >= 2.*got 1"),
    (dict(quantize="int4", group_size=True), r"group_size must be an integer >= 2.*got True"),
    (dict(quantize="int8", quantize_embeddings="no"), r"quantize_embeddings must be True or False, got 'no'"),
    (dict(quantize="int4", clip_search=1), r"clip_search must be True, False or None \(on for 4-bit grids\), got 1"),
])
def test_bad_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**options)


# ---- SparseGPT's joint sweep ------------------------------------------------------------


@pytest.mark.parametrize("scheme,pattern,sparsity", [
    (INT4_G32, Unstructured(), 0.5), (INT4_G32, NM(2, 4), None), (INT8, Unstructured(), 0.5),
    (INT8, Unstructured(), 0.0), (INT4_G32, Unstructured(), 0.0),
])
@pytest.mark.parametrize("seed", range(4))
def test_joint_sweep_beats_pruning_then_rounding(scheme, pattern, sparsity, seed):
    W, X = _layer(seed)
    gram = X.t() @ X
    [(joint, keep, grid)] = sparsegpt_quantize_many([W], gram, pattern, sparsity, scheme)
    [(pruned, pruned_keep)] = sparsegpt_prune_many([W], gram, pattern, sparsity)
    rounded, _ = fake_quantize(pruned, scheme, pruned_keep)
    _assert_on_grid(joint, keep, grid)
    assert _output_error(W, joint, X) < _output_error(W, rounded, X)


@pytest.mark.parametrize("seed", range(4))
def test_joint_int8_at_2of4_is_within_mask_noise_of_pruning_then_rounding(seed):
    """int8's rounding error is so small against 2:4's pruning error that which weights the joint sweep's
    slightly different updates keep decides the comparison, either way: within 1%."""
    W, X = _layer(seed)
    gram = X.t() @ X
    [(joint, keep, grid)] = sparsegpt_quantize_many([W], gram, NM(2, 4), None, INT8)
    [(pruned, pruned_keep)] = sparsegpt_prune_many([W], gram, NM(2, 4), None)
    rounded, _ = fake_quantize(pruned, INT8, pruned_keep)
    _assert_on_grid(joint, keep, grid)
    assert _output_error(W, joint, X) < 1.01 * _output_error(W, rounded, X)


@pytest.mark.parametrize("scheme", [INT8, INT4_G32, QuantScheme(bits=4, group_size=48, symmetric=False)])
@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (NM(2, 4), None), (Unstructured(), 0.6)])
def test_layers_sharing_an_input_get_the_result_of_each_alone(scheme, pattern, sparsity):
    W, X = _layer(0, rows=48)
    gram = X.t() @ X
    parts = [W[:16], W[16:]]
    stacked = sparsegpt_quantize_many(parts, gram, pattern, sparsity, scheme, block_size=64)
    for part, (weight, keep, grid) in zip(parts, stacked):
        [(alone, alone_keep, alone_grid)] = sparsegpt_quantize_many([part], gram, pattern, sparsity, scheme,
                                                                    block_size=64)
        _assert_on_grid(weight, keep, grid)
        assert torch.equal(keep, alone_keep) and torch.equal(grid.scale, alone_grid.scale)
        torch.testing.assert_close(weight, alone, rtol=0, atol=1e-6)
        assert grid.scale.shape == (part.shape[0], scheme.groups(W.shape[1]))


@pytest.mark.parametrize("search", [False, True])
def test_a_group_grid_is_found_from_the_updated_kept_weights(search):
    """The sweep's grid of group g equals find_grid of the weights as they were when it reached the group's
    first column, over the entries not pruned: what `SweepGrids.find` is given; a searched grid weighs
    each column by 1 / d^2."""
    grids = SweepGrids(replace(INT4_G32, search=search), (3, 64), torch.device("cpu"))
    values = torch.randn(32, 3)  # (width, rows), transposed as the sweep holds them
    kept = torch.rand(32, 3) < 0.5
    diag = torch.rand(32) + 0.1
    grids.find(32, values, kept, diag)
    expected = find_grid(values.t(), QuantScheme(bits=4, search=search), kept.t(), 1.0 / diag.square())
    assert torch.equal(grids.scale[:, 1], expected.scale[:, 0]) and not grids.scale[:, 0].any()
    column = values[5]
    [grid] = grids.grids([3])
    on_grid = dequantize(quantize(column[:, None].expand(-1, 64), grid), grid)[:, 40]
    assert torch.equal(grids.round(column), on_grid)


@pytest.mark.parametrize("scheme", [INT8, INT4_G32, QuantScheme(bits=4, group_size=32, symmetric=False)])
def test_zero_rows_and_dead_inputs_stay_finite_and_on_their_grids(scheme):
    W, X = _layer(1)
    W[3] = 0.0
    X[:, 32:64] = 0.0  # inputs never active: their weights are zeroed, a whole group of them
    [(weight, keep, grid)] = sparsegpt_quantize_many([W], X.t() @ X, Unstructured(), 0.5, scheme)
    assert torch.isfinite(weight).all() and not weight[3].any() and not weight[:, 32:64].any()
    _assert_on_grid(weight, keep, grid)


# ---- the C++ joint sweep (kernels/csrc/sparsegpt_joint.h) against its torch reference -----

needs_joint_op = pytest.mark.skipif(joint_sweep_op() is None, reason="no C++ joint sweep on this machine")


def _sweep_inputs(width, out, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * width, width, generator=g) * (torch.rand(width, generator=g) * 3 + 0.1)
    block = torch.randn(width, out, generator=g)
    pruned = torch.rand(width, out, generator=g) < 0.5 if m == 0 else torch.zeros(width, out, dtype=torch.bool)
    return block, inverse_hessian_factor(X.t() @ X, 0.01), pruned


@needs_joint_op
@pytest.mark.parametrize("scheme", [INT4_G32, QuantScheme(bits=4, group_size=32, symmetric=False),
                                    QuantScheme(bits=8, group_size=16), replace(INT4_G32, search=True),
                                    QuantScheme(bits=4, group_size=32, symmetric=False, search=True)])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
@pytest.mark.parametrize("width,out", [(64, 40), (96, 100)])
def test_the_cpp_joint_sweep_matches_the_torch_sweep(scheme, n, m, width, out):
    """Same grids, codes and errors, but for the few weights whose updates, fused multiply-adds in C++,
    land on the other side of a rounding boundary than torch's."""
    block, hinv, pruned = _sweep_inputs(width, out, m)
    results = []
    for op in (None, joint_sweep_op()):
        b, p, e = block.clone(), pruned.clone(), torch.zeros(width, out)
        grids = SweepGrids(scheme, (out, width), b.device)
        if op is None:
            sweep_joint(b, hinv, p, e, n, m, grids, 0)
        else:
            sweep_joint_with_op(op, b, hinv, p, e, n, m, grids, 0)
        results.append((b, p, e, grids.grids([out])[0]))
    (b1, p1, e1, g1), (b2, p2, e2, g2) = results
    assert torch.equal(g1.scale[:, 0], g2.scale[:, 0])  # the first group's grid sees no update: exact
    assert (g1.scale == g2.scale).float().mean() > 0.97
    assert (p1 == p2).float().mean() > 0.99
    assert ((b1 - b2).abs() > 1e-5).float().mean() < 0.02
    assert ((e1 - e2).abs() > 1e-4).float().mean() < 0.02
    for b, p, grid in ((b1, p1, g1), (b2, p2, g2)):
        _assert_on_grid(b.t().contiguous(), ~p.t(), grid)


@needs_joint_op
@pytest.mark.parametrize("scheme", [INT8, INT4_G32, QuantScheme(bits=4, group_size=32, symmetric=False),
                                    replace(INT4_G32, search=True)])
@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (NM(2, 4), None)])
def test_joint_layers_are_as_good_with_or_without_the_op(scheme, pattern, sparsity, monkeypatch):
    W, X = _layer(2, rows=72)  # two whole slices of 32 rows and a partial one
    gram = X.t() @ X
    [(w1, k1, g1)] = sparsegpt_quantize_many([W], gram, pattern, sparsity, scheme, block_size=64)
    monkeypatch.setattr(sparsegpt, "joint_sweep_op", lambda: None)
    [(w2, k2, g2)] = sparsegpt_quantize_many([W], gram, pattern, sparsity, scheme, block_size=64)
    _assert_on_grid(w1, k1, g1)
    _assert_on_grid(w2, k2, g2)
    assert (k1 == k2).float().mean() > 0.99
    assert _output_error(W, w1, X) == pytest.approx(_output_error(W, w2, X), rel=5e-3)


# ---- the pipeline -----------------------------------------------------------------------


def _check_model(model, report):
    modules = dict(model.named_modules())
    assert set(report.masks) <= set(report.grids)
    for name, grid in report.grids.items():
        module = modules[name]
        weight = weight_matrix(module) if name in report.masks else module.weight
        keep = report.masks.get(name, torch.ones_like(weight, dtype=torch.bool))
        _assert_on_grid(weight, keep, grid, name)
        if name in report.layers:  # the zeros measured are those of the final weights
            assert report.layers[name].sparsity == pytest.approx(float((weight == 0).float().mean()), abs=1e-9)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g32-asym"])
def test_every_weight_lies_on_its_grid_and_pruned_weights_stay_zero(method, pattern, scheme):
    model = tiny_llama()
    report = sparsetorch.prune(model, calibration_ids(), method=method, pattern=pattern, quantize=scheme,
                               progress=False)
    _check_model(model, report)
    assert set(report.grids) == set(report.masks) | {"model.embed_tokens", "lm_head"}  # untied: both embeddings
    assert report.grids["model.embed_tokens"].scheme == QuantScheme(bits=8)
    assert all(layer.sparsity >= 0.5 - 1e-6 for layer in report.layers.values())  # kept weights may round to 0
    record = report.to_dict()["quantization"]
    assert record["scheme"] == scheme and record["method"] == ("gptq" if method == "sparsegpt" else "rtn")
    assert record["embeddings"]["modules"] == ["model.embed_tokens", "lm_head"]
    json.dumps(report.to_dict())  # plain data: the grids stay out of it


@pytest.mark.parametrize("steps", [{"refine": "dsnot"}, {"reconstruct": "layer"},
                                   {"refine": "dsnot", "reconstruct": "block"}, {"layer_inputs": "pruned"}])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_steps_after_the_method_end_on_grids(method, steps):
    model = tiny_llama()
    report = sparsetorch.prune(model, calibration_ids(), method=method, pattern="2:4", quantize="int4-g32",
                               progress=False, **steps)
    _check_model(model, report)
    order = report.to_dict()["quantization"]["order"]
    if "reconstruct" in steps or "refine" in steps:
        assert order[-2].startswith("round to nearest") and order[-1].startswith("embeddings")
    if steps.get("reconstruct") == "block":
        assert "block reconstruction" in order
        assert all(fit.loss_after <= fit.loss_before for fit in report.blocks.values())


def test_joint_sparsegpt_keeps_its_own_grids_where_no_step_changed_the_weights():
    dense = tiny_llama()
    ids = calibration_ids()
    joint, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    plain = sparsetorch.prune(joint, ids, method="sparsegpt", quantize="int4-g32", progress=False)
    after = sparsetorch.prune(refined, ids, method="sparsegpt", quantize="int4-g32", reconstruct="layer",
                              progress=False)
    assert plain.to_dict()["quantization"]["order"] == ["sparsegpt joint sweep (gptq)",
                                                        "embeddings: int8 per row, round to nearest"]
    changed = [name for name in plain.masks if not torch.equal(plain.grids[name].scale, after.grids[name].scale)]
    assert changed  # the refit moved weights, so they were rounded again, onto grids of their own


def test_tied_embeddings_are_rounded_once_and_can_be_left_alone():
    model = tiny_llama(tie=True)
    report = sparsetorch.prune(model, calibration_ids(), method="wanda", quantize="int8", progress=False)
    assert report.to_dict()["quantization"]["embeddings"]["modules"] == ["model.embed_tokens"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    dense = tiny_llama()
    kept = copy.deepcopy(dense)
    report = sparsetorch.prune(kept, calibration_ids(), method="wanda", quantize="int8", quantize_embeddings=False,
                               progress=False)
    assert "model.embed_tokens" not in report.grids and report.to_dict()["quantization"]["embeddings"] is None
    assert torch.equal(kept.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_a_pruned_lm_head_gets_the_layers_scheme():
    model = tiny_llama()
    report = sparsetorch.prune(model, None, method="magnitude", ignore=(), quantize="int4-g32", progress=False)
    assert report.grids["lm_head"].scheme == QuantScheme(bits=4, group_size=32)
    assert report.to_dict()["quantization"]["embeddings"]["modules"] == ["model.embed_tokens"]
    _check_model(model, report)


def test_a_half_precision_model_is_refused_before_any_weight_changes():
    model = tiny_llama().to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"quantize='int8' needs float32 weights.*model.layers.0.self_attn.q_proj "
                                         r"is torch.bfloat16: load the model with dtype=torch.float32"):
        sparsetorch.prune(model, calibration_ids(), method="wanda", quantize="int8", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_quantize_leaves_the_report_as_before():
    report = sparsetorch.prune(tiny_llama(), None, method="magnitude", progress=False)
    assert report.grids == {} and "quantization" not in report.to_dict()


# ---- resume -----------------------------------------------------------------------------


class _InterruptedAfterBlock0(ResumeCheckpoint):
    def save(self, index, *args):
        super().save(index, *args)
        raise KeyboardInterrupt


@pytest.mark.parametrize("scheme", ["int8", "int4-g32-asym"])
def test_a_resumed_run_restores_the_grids_of_the_finished_blocks(tmp_path, scheme):
    dense = tiny_llama().state_dict()
    config = PruneConfig(method="sparsegpt", pattern="2:4", quantize=scheme)
    ids = calibration_ids()

    def fresh():
        model = tiny_llama()
        model.load_state_dict(dense)
        return model

    reference = fresh()
    expected = sparsetorch.prune(reference, ids, config, progress=False)
    with pytest.raises(KeyboardInterrupt):
        sparsetorch.prune(fresh(), ids, config, progress=False,
                          checkpoint=_InterruptedAfterBlock0(tmp_path, config, ids))
    resumed_model = fresh()
    resumed = sparsetorch.prune(resumed_model, ids, config, progress=False,
                                checkpoint=ResumeCheckpoint(tmp_path, config, ids))
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert resumed.grids.keys() == expected.grids.keys()
    for name, grid in expected.grids.items():
        assert torch.equal(resumed.grids[name].scale, grid.scale), name
        assert (grid.zero_point is None) == (resumed.grids[name].zero_point is None)
        assert grid.zero_point is None or torch.equal(resumed.grids[name].zero_point, grid.zero_point)
    _check_model(resumed_model, resumed)


def test_a_checkpoint_without_grids_is_refused_for_a_quantizing_run(tmp_path):
    config = PruneConfig(method="sparsegpt", quantize="int8")
    ids = calibration_ids()
    with pytest.raises(KeyboardInterrupt):
        sparsetorch.prune(tiny_llama(), ids, config, progress=False,
                          checkpoint=_InterruptedAfterBlock0(tmp_path, config, ids))
    from safetensors.torch import load_file, save_file

    block = tmp_path / "block-0000.safetensors"
    save_file({k: v for k, v in load_file(block).items() if not k.endswith(".scale")}, block)
    with pytest.raises(DamagedCheckpointError, match="holds no value grid for model.layers.0.*--restart"):
        sparsetorch.prune(tiny_llama(), ids, config, progress=False, checkpoint=ResumeCheckpoint(tmp_path, config, ids))


# ---- the command line -------------------------------------------------------------------


def _prune_args(model_dir, out, calib, *extra):
    return ["prune", str(model_dir), "--out", str(out), "--calib-text", str(calib),
            "--calib-samples", "8", "--seqlen", "64", "--quiet", *extra]


def _save_takes_grids() -> bool:
    from sparsetorch.formats.pruned import save_pruned

    return "grids" in inspect.signature(save_pruned).parameters


def test_prune_help_explains_quantize():
    from sparsetorch.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "--quantize {int8,int4}" in text and "--group-size" in text and "--keep-embeddings" in text


def test_a_bad_quantize_value_is_named_and_nothing_is_written(tiny_model_dir, text_files, tmp_path, capsys):
    from sparsetorch.cli import main

    out = tmp_path / "o"
    assert main(_prune_args(tiny_model_dir, out, text_files[0], "--quantize", "int5")) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetorch prune: error: quantize='int5'") and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not _save_takes_grids(), reason="save_pruned(grids=...) is not in this tree yet (formats/*)")
def test_prune_with_quantize_from_the_command_line(tiny_model_dir, text_files, tmp_path, capsys):
    from sparsetorch.cli import main

    out = tmp_path / "q"
    assert main(_prune_args(tiny_model_dir, out, text_files[0], "--method", "sparsegpt", "--pattern", "2:4",
                            "--quantize", "int4", "--group-size", "32", "--clip-search")) == 0
    assert "kept weights int4-g32 (gptq)" in capsys.readouterr().out
    record = json.loads((out / "sparsity.json").read_text())
    assert record["config"]["quantize"] == "int4-g32" and record["quantization"]["method"] == "gptq"
    assert record["config"]["clip_search"] and record["quantization"]["search"]
    assert record["quantization"]["embeddings"]["modules"] == ["model.embed_tokens"]  # tied: one
    from sparsetorch.formats.pruned import load_pruned

    dense, compressed = load_pruned(out).state_dict(), load_pruned(out, compressed=True).state_dict()
    assert all(torch.equal(compressed[key], value) for key, value in dense.items())
    assert (out / "compressed" / "model.safetensors").stat().st_size < 0.5 * (out / "model.safetensors").stat().st_size
    from sparsetorch.formats.checkpoint import read_grids

    exported = tmp_path / "exported"  # re-exported with another codec: still quantized, the same weights
    assert main(["export", str(out), "--out", str(exported), "--codec", "none"]) == 0
    assert set(read_grids(exported)) == set(read_grids(out / "compressed")) != set()
    again = load_pruned(exported, compressed=True).state_dict()
    assert all(torch.equal(again[key], value) for key, value in dense.items())
