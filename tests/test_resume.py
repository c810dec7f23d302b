"""Resume checkpoints: what a save holds, when a checkpoint is refused, and resuming in a fresh model."""

import json

import pytest
import torch

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot.report import LayerReport
from sparsetorch.oneshot.resume import ResumeCheckpoint, StaleCheckpointError
from sparsetorch.targets import find_targets


def _block_state(model, block):
    """What the pipeline would save after `block`: its target names, pruned weights' masks and reports."""
    targets = find_targets(model, None, ("lm_head",))
    names = [name for name in targets if name.startswith(f"model.layers.{block}.")]
    masks, layers = {}, {}
    with torch.no_grad():
        for name in names:
            weight = targets[name].weight
            masks[name] = torch.rand_like(weight) < 0.5
            weight.mul_(masks[name])
            layers[name] = LayerReport(name=name, shape=tuple(weight.shape), target_sparsity=0.5,
                                       sparsity=1 - masks[name].float().mean().item(), seconds=0.125)
    return names, masks, layers


def _saved(tmp_path, config, ids, blocks=1):
    """A checkpoint of `blocks` blocks of a tiny Llama; the model and what was saved."""
    model = tiny_llama()
    modules = dict(model.named_modules())
    checkpoint = ResumeCheckpoint(tmp_path, config, ids)
    masks, layers = {}, {}
    for block in range(blocks):
        names, block_masks, block_layers = _block_state(model, block)
        masks.update(block_masks)
        layers.update(block_layers)
        hidden = [torch.randn(2, 4, 64), torch.randn(1, 4, 64)]
        checkpoint.save(block, names, modules, layers, masks, hidden)
    return model, masks, layers, hidden


def test_save_and_restore_round_trip_weights_masks_reports_and_hidden(tmp_path):
    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    saved, masks, layers, hidden = _saved(tmp_path, config, ids)
    fresh = tiny_llama()
    untouched = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("model.layers.1.")}
    restored_layers, restored_masks = {}, {}
    start, restored_hidden = ResumeCheckpoint(tmp_path, config, ids).restore(
        dict(fresh.named_modules()), restored_layers, restored_masks)
    assert start == 1
    assert all(torch.equal(a, b) for a, b in zip(restored_hidden, hidden, strict=True))
    assert restored_layers == layers  # shapes back as tuples, floats exact
    assert restored_masks.keys() == masks.keys()
    for name, keep in masks.items():
        assert restored_masks[name].dtype == torch.bool
        assert torch.equal(restored_masks[name], keep)
    for key, value in saved.state_dict().items():
        if key.startswith("model.layers.0."):
            assert torch.equal(fresh.state_dict()[key], value), key
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in untouched.items())  # block 1 was never saved


def test_restore_reads_every_block_saved_and_the_last_hidden(tmp_path):
    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    saved, masks, _, hidden = _saved(tmp_path, config, ids, blocks=2)
    fresh = tiny_llama()
    restored_masks = {}
    start, restored_hidden = ResumeCheckpoint(tmp_path, config, ids).restore(
        dict(fresh.named_modules()), {}, restored_masks)
    assert start == 2
    assert torch.equal(restored_hidden[0], hidden[0])
    assert restored_masks.keys() == masks.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.state_dict().items() if "layers" in k)


def test_restore_without_a_checkpoint_starts_at_block_0(tmp_path):
    layers, masks = {}, {}
    checkpoint = ResumeCheckpoint(tmp_path / "none", sparsetorch.PruneConfig(), calibration_ids())
    assert checkpoint.restore({}, layers, masks) == (0, None)
    assert layers == {} and masks == {}
    assert not (tmp_path / "none").exists()


def test_saves_leave_only_the_checkpoint_files(tmp_path):
    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    _saved(tmp_path, config, ids, blocks=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block-0000.safetensors", "block-0001.safetensors", "hidden-0002.pt", "progress.json"]
    assert json.loads((tmp_path / "progress.json").read_text())["blocks_done"] == 2


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    model, _, _, hidden = _saved(tmp_path, config, ids)
    real_save = torch.save

    def save_half_then_fail(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    names, masks, layers = _block_state(model, 1)
    with pytest.raises(KeyboardInterrupt):
        ResumeCheckpoint(tmp_path, config, ids).save(1, names, dict(model.named_modules()), layers, masks, [])
    monkeypatch.undo()
    start, restored_hidden = ResumeCheckpoint(tmp_path, config, ids).restore(dict(tiny_llama().named_modules()), {}, {})
    assert start == 1
    assert torch.equal(restored_hidden[0], hidden[0])


def test_a_crash_before_progress_is_written_does_not_pair_new_outputs_with_old_progress(tmp_path, monkeypatch):
    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    model, _, _, hidden = _saved(tmp_path, config, ids)
    names, masks, layers = _block_state(model, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pathlib.Path.write_text", crash)  # progress.json's write, the last of a save
    with pytest.raises(KeyboardInterrupt):
        ResumeCheckpoint(tmp_path, config, ids).save(1, names, dict(model.named_modules()), layers, masks,
                                                      [torch.zeros(2, 4, 64)])
    monkeypatch.undo()
    start, restored_hidden = ResumeCheckpoint(tmp_path, config, ids).restore(dict(tiny_llama().named_modules()), {}, {})
    assert start == 1
    assert torch.equal(restored_hidden[0], hidden[0])  # block 1's inputs, not its outputs


@pytest.mark.parametrize("other_config,other_ids", [
    (sparsetorch.PruneConfig(sparsity=0.6), calibration_ids()),
    (sparsetorch.PruneConfig(), calibration_ids(seed=2)),  # same shape, other tokens
    (sparsetorch.PruneConfig(), calibration_ids()[:-1]),
], ids=["config", "data", "shape"])
def test_a_checkpoint_of_other_settings_or_data_is_refused_with_the_restart_hint(tmp_path, other_config, other_ids):
    _saved(tmp_path, sparsetorch.PruneConfig(), calibration_ids())
    layers, masks = {}, {}
    with pytest.raises(StaleCheckpointError, match="--restart"):
        ResumeCheckpoint(tmp_path, other_config, other_ids).restore(dict(tiny_llama().named_modules()), layers, masks)
    assert layers == {} and masks == {}
    assert issubclass(StaleCheckpointError, ValueError)


def test_clear_removes_the_directory(tmp_path):
    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    _saved(tmp_path / "run", config, ids)
    checkpoint = ResumeCheckpoint(tmp_path / "run", config, ids)
    checkpoint.clear()
    assert not (tmp_path / "run").exists()
    checkpoint.clear()  # nothing left to remove: no error
    assert checkpoint.restore({}, {}, {}) == (0, None)


class InterruptedAfterTwoBlocks(ResumeCheckpoint):
    def save(self, index, *args):
        super().save(index, *args)
        if index == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("layer_inputs", ["dense", "pruned"])
def test_resuming_in_a_fresh_dense_model_gives_bit_identical_weights_and_masks(tmp_path, layer_inputs, monkeypatch):
    """As after a crash: the resumed run starts from the original dense model, restores blocks 0-1 from disk
    and solves only block 2."""
    dense = tiny_llama(layers=3).state_dict()
    config = sparsetorch.PruneConfig(method="sparsegpt", pattern="2:4", layer_inputs=layer_inputs)
    ids = calibration_ids()

    def fresh():
        model = tiny_llama(layers=3)
        model.load_state_dict(dense)
        return model

    reference = fresh()
    expected = sparsetorch.prune(reference, ids, config, progress=False)
    with pytest.raises(KeyboardInterrupt):
        sparsetorch.prune(fresh(), ids, config, progress=False, checkpoint=InterruptedAfterTwoBlocks(tmp_path, config, ids))

    from sparsetorch.oneshot import pipeline

    solved = []
    prune_group = pipeline._LayerPruner.prune_group
    monkeypatch.setattr(pipeline._LayerPruner, "prune_group",
                        lambda self, modules, stat: (solved.extend(self.names[m] for m in modules),
                                                     prune_group(self, modules, stat))[1])
    resumed_model = fresh()
    resumed = sparsetorch.prune(resumed_model, ids, config, progress=False,
                                checkpoint=ResumeCheckpoint(tmp_path, config, ids))
    assert solved and all(name.startswith("model.layers.2.") for name in solved)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert resumed.masks.keys() == expected.masks.keys()
    assert all(torch.equal(resumed.masks[n], expected.masks[n]) for n in expected.masks)
    assert {n: r.sparsity for n, r in resumed.layers.items()} == {n: r.sparsity for n, r in expected.layers.items()}


def test_a_checkpoint_of_another_model_is_refused_naming_both(tmp_path):
    from sparsetorch.oneshot.resume import model_identity

    config, ids = sparsetorch.PruneConfig(method="sparsegpt"), calibration_ids()
    torch.manual_seed(0)
    first = tiny_llama(layers=3)
    names, masks, layers = _block_state(first, 0)
    ResumeCheckpoint(tmp_path, config, ids, first).save(0, names, dict(first.named_modules()), layers, masks,
                                                        [torch.zeros(1)])
    torch.manual_seed(1)
    second = tiny_llama(layers=3)
    with pytest.raises(StaleCheckpointError, match="another model .*this run prunes a llama model of"):
        ResumeCheckpoint(tmp_path, config, ids, second).restore(dict(second.named_modules()), {}, {})
    # pruning changes only the targets' weights, so the identity holds across a partly pruned model
    identity = model_identity(first, config)
    with torch.no_grad():
        first.model.layers[0].mlp.down_proj.weight.zero_()
    assert model_identity(first, config) == identity


@pytest.mark.parametrize("damage", ["hidden", "block", "progress"])
def test_a_damaged_checkpoint_says_so_and_changes_nothing(tmp_path, damage):
    from sparsetorch.oneshot.resume import DamagedCheckpointError

    config, ids = sparsetorch.PruneConfig(), calibration_ids()
    _saved(tmp_path, config, ids)
    target = {"hidden": next(tmp_path.glob("hidden-*.pt")), "block": tmp_path / "block-0000.safetensors",
              "progress": tmp_path / "progress.json"}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(DamagedCheckpointError, match=f"{target.name} is damaged .*rerun with --restart"):
        ResumeCheckpoint(tmp_path, config, ids).restore(dict(fresh.named_modules()), {}, {})
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
