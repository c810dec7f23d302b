"""The sequential block pipeline on tiny models of each supported family."""

import pytest
import torch
from torch import nn

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.oneshot.lockstep import StopPoints
from sparsetorch.patterns import NM, Unstructured
from sparsetorch.targets import weight_matrix


def _family(name):
    import transformers as tf

    small = dict(vocab_size=128)
    configs = {
        "llama": lambda: tiny_llama(),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **small)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **small)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **small)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
            max_position_embeddings=64, **small)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **small)),
    }
    return configs[name]().eval()


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox"]
EXPECTED_LAYERS = {"llama": 14, "mistral": 14, "qwen2": 14, "gpt2": 8, "opt": 12, "gpt_neox": 8}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern", [("wanda", None), ("sparsegpt", "2:4"), ("sparsegpt", "unstructured")])
def test_every_family_prunes_every_block_linear_exactly(family, method, pattern):
    model = _family(family)
    report = sparsetorch.prune(model, calibration_ids(), method=method, pattern=pattern, progress=False)
    assert len(report.layers) == EXPECTED_LAYERS[family]
    modules = dict(model.named_modules())
    for name, layer in report.layers.items():
        W = weight_matrix(modules[name])
        assert layer.sparsity == pytest.approx(0.5)
        if pattern == "2:4":  # groups along the input dimension, also for GPT-2's transposed Conv1D
            assert ((W != 0).reshape(-1, 4).sum(dim=1) <= 2).all()
        assert torch.equal(report.masks[name], report.masks[name] & True)
    logits = model(input_ids=calibration_ids(windows=1)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_exactly_with_mixed_layer_inputs(family):
    """'mixed' finds each family's last layer group (down_proj, fc2, c_proj, dense_4h_to_h)
    from the first batch's order, whatever the block layout."""
    model = _family(family)
    report = sparsetorch.prune(model, calibration_ids(), method="sparsegpt", pattern="2:4", layer_inputs="mixed",
                               batch_size=3, progress=False)
    assert len(report.layers) == EXPECTED_LAYERS[family]
    assert all(layer.sparsity == pytest.approx(0.5) for layer in report.layers.values())
    assert torch.isfinite(model(input_ids=calibration_ids(windows=1)).logits).all()


def _layer_inputs(model, ids):
    """Every Linear's input on `ids`, captured from a plain forward of the (pruned) model."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for batch in ids.split(3):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in inputs.items()}


def _wanda_masks_from(inputs, original, names):
    masks = {}
    for name in names:
        scores = original[name].abs() * (inputs[name] ** 2).sum(0).double().sqrt().float()
        masks[name] = Unstructured(per_row=True).mask(scores, 0.5)
    return masks


def test_pruned_layer_inputs_come_from_the_already_pruned_layers():
    """After pruning, a plain forward gives every layer the input it was calibrated on
    (its predecessors are pruned, it itself does not change its input), so recomputing
    Wanda's masks from those inputs must give back exactly the masks that were used."""
    model = tiny_llama()
    original = {n: weight_matrix(m).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = calibration_ids()
    report = sparsetorch.prune(model, ids, method="wanda", layer_inputs="pruned", progress=False)
    expected = _wanda_masks_from(_layer_inputs(model, ids), original, report.masks)
    for name, keep in report.masks.items():
        assert torch.equal(expected[name], keep), name


def test_dense_layer_inputs_come_from_the_dense_block_after_pruned_blocks():
    """With layer_inputs='dense', block i's layers see what the still-dense block i
    computes from the output of the already-pruned blocks before it."""
    model = tiny_llama(layers=3)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    original = {n: weight_matrix(m).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = calibration_ids()
    report = sparsetorch.prune(model, ids, method="wanda", layer_inputs="dense", progress=False)
    pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
    for block in range(3):
        hybrid = {k: (pruned_state[k] if _block_of(k) < block else dense_state[k]) for k in dense_state}
        model.load_state_dict(hybrid)
        names = [n for n in report.masks if _block_of(n) == block]
        expected = _wanda_masks_from(_layer_inputs(model, ids), original, names)
        for name in names:
            assert torch.equal(expected[name], report.masks[name]), name


def test_mixed_layer_inputs_calibrate_only_the_last_layer_on_pruned_inputs():
    """With layer_inputs='mixed', every layer of block i but its last (down_proj) sees what
    the still-dense block i computes after the pruned blocks before it; down_proj sees
    what the pruned block feeds it, which is its input in the finished pruned model."""
    model = tiny_llama(layers=3)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    original = {n: weight_matrix(m).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = calibration_ids()
    report = sparsetorch.prune(model, ids, method="wanda", layer_inputs="mixed", batch_size=3, progress=False)
    pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
    downs = [n for n in report.masks if n.endswith("down_proj")]
    expected = _wanda_masks_from(_layer_inputs(model, ids), original, downs)
    for name in downs:
        assert torch.equal(expected[name], report.masks[name]), name
    for block in range(3):
        hybrid = {k: (pruned_state[k] if _block_of(k) < block else dense_state[k]) for k in dense_state}
        model.load_state_dict(hybrid)
        names = [n for n in report.masks if _block_of(n) == block and n not in downs]
        expected = _wanda_masks_from(_layer_inputs(model, ids), original, names)
        for name in names:
            assert torch.equal(expected[name], report.masks[name]), name


def _block_of(name):
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1


def test_every_layer_input_mode_prunes_exactly():
    for mode in ("dense", "pruned", "mixed"):
        report = sparsetorch.prune(tiny_llama(), calibration_ids(), method="sparsegpt", pattern="2:4",
                                   layer_inputs=mode, progress=False)
        assert all(layer.sparsity == 0.5 for layer in report.layers.values())
    with pytest.raises(ValueError, match=r"layer_inputs must be one of \['dense', 'pruned', 'mixed'\]"):
        sparsetorch.PruneConfig(layer_inputs="both")


@pytest.mark.parametrize("mode", ["dense", "pruned", "mixed"])
def test_results_do_not_depend_on_the_batch_size(mode):
    weights = []
    for batch_size in (1, 3, 8):
        model = tiny_llama()
        torch.manual_seed(0)
        model.load_state_dict(tiny_llama().state_dict())
        sparsetorch.prune(model, calibration_ids(), method="sparsegpt", batch_size=batch_size, layer_inputs=mode,
                          progress=False)
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(weights[0], weights[2], atol=1e-4, rtol=0)


def test_any_module_with_explicit_targets():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    data = torch.randn(64, 16)
    report = sparsetorch.prune(model, data, method="sparsegpt", pattern="2:4", targets=["re:[02]"], progress=False)
    assert sorted(report.layers) == ["0", "2"]
    assert report.sparsity == pytest.approx(0.5)


def test_unknown_family_says_how_to_pass_blocks_or_targets():
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"no block layout.*--blocks.*--targets"):
        sparsetorch.prune(model, torch.randn(4, 16), method="wanda", progress=False)


def test_magnitude_needs_no_calibration_but_wanda_does():
    model = tiny_llama()
    assert sparsetorch.prune(model, None, method="magnitude", progress=False).sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs calibration data"):
        sparsetorch.prune(tiny_llama(), None, method="wanda", progress=False)


def test_layers_outside_blocks_are_refused_before_any_change():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="lm_head"):
        sparsetorch.prune(model, calibration_ids(), method="wanda", ignore=[], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_that_does_not_fit_the_pattern_names_the_layer_and_changes_nothing():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj.*divisible by 3"):
        sparsetorch.prune(model, calibration_ids(), method="sparsegpt", pattern="2:3", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_random_baseline_differs_per_layer_and_is_seeded():
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    ra = sparsetorch.prune(a, None, method="random", seed=3, progress=False)
    rb = sparsetorch.prune(b, None, method="random", seed=3, progress=False)
    assert all(torch.equal(ra.masks[n], rb.masks[n]) for n in ra.masks)
    q0, q1 = ra.masks["model.layers.0.self_attn.q_proj"], ra.masks["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1)


def test_config_round_trips_through_json():
    config = sparsetorch.PruneConfig(method="sparsegpt", pattern="2:4", ignore=("lm_head", "re:.*gate.*"))
    assert sparsetorch.PruneConfig.from_dict(config.to_dict()) == config
    assert config.sparsity == 0.5 and NM(2, 4).spec == config.pattern
    with pytest.raises(ValueError, match="unknown PruneConfig keys"):
        sparsetorch.PruneConfig.from_dict({"method": "wanda", "sparsty": 0.5})
    with pytest.raises(ValueError, match="unknown pruning method 'obs'; available"):
        sparsetorch.PruneConfig(method="obs")


@pytest.mark.parametrize("layer_inputs", ["dense", "mixed"])
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, layer_inputs):
    from sparsetorch.oneshot.resume import ResumeCheckpoint, StaleCheckpointError

    reference = tiny_llama(layers=3)
    interrupted = tiny_llama(layers=3)
    interrupted.load_state_dict(reference.state_dict())
    config = sparsetorch.PruneConfig(method="sparsegpt", pattern="2:4", layer_inputs=layer_inputs)
    ids = calibration_ids()
    expected = sparsetorch.prune(reference, ids, config, progress=False)

    class InterruptedAfterTwoBlocks(ResumeCheckpoint):
        def save(self, index, *args):
            super().save(index, *args)
            if index == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sparsetorch.prune(interrupted, ids, config, progress=False,
                          checkpoint=InterruptedAfterTwoBlocks(tmp_path, config, ids))
    assert json_blocks_done(tmp_path) == 2
    resumed = sparsetorch.prune(interrupted, ids, config, progress=False, checkpoint=ResumeCheckpoint(tmp_path, config, ids))
    assert resumed.layers.keys() == expected.layers.keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(interrupted.state_dict()[key], value), key
    assert all(torch.equal(resumed.masks[n], expected.masks[n]) for n in expected.masks)

    other = sparsetorch.PruneConfig(method="wanda")
    with pytest.raises(StaleCheckpointError, match="other settings"):
        sparsetorch.prune(tiny_llama(layers=3), ids, other, progress=False, checkpoint=ResumeCheckpoint(tmp_path, other, ids))


def json_blocks_done(directory):
    import json

    return json.loads((directory / "progress.json").read_text())["blocks_done"]


def test_mixed_statistics_forwards_of_later_blocks_stop_before_the_mlp_expansion(monkeypatch):
    """The first block's first batch runs to its down_proj to learn the layer order;
    blocks of the same layout then skip gate/up in every statistics batch, with the very
    same masks as when each block learns the order again. (An explicit `blocks` path runs
    transformers' own blocks, whose gate_proj the test can hook.)"""
    def prune_counting_gate_calls(model):
        runs = []
        for layer in model.model.layers:
            layer.mlp.gate_proj.register_forward_hook(lambda *args: runs.append(1))
        report = sparsetorch.prune(model, calibration_ids(windows=8), method="wanda", layer_inputs="mixed",
                                   batch_size=4, blocks="model.layers", progress=False)
        return report, len(runs)

    torch.manual_seed(0)
    report, gate_runs = prune_counting_gate_calls(tiny_llama(layers=3))
    # capturing the blocks' arguments runs the first batch through blocks 0-1 (block 2's hook ends it); then, over
    # 2 batches, block 0 runs gate_proj in its first statistics batch and in its pruned pass, blocks 1-2 only in theirs
    capture = 2
    assert gate_runs == capture + (1 + 2) + 2 + 2
    monkeypatch.setattr(StopPoints, "find", lambda self, layout: None)  # every block learns the order itself
    torch.manual_seed(0)
    relearned, relearned_runs = prune_counting_gate_calls(tiny_llama(layers=3))
    assert relearned_runs == capture + 3 * (1 + 2)
    assert all(torch.equal(report.masks[name], relearned.masks[name]) for name in report.masks)


def test_a_block_of_another_layout_learns_its_own_order():
    stops = StopPoints()
    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    stops.learn({a: "attn.q", b: "mlp.up"}, [[a], [b]])
    assert stops.find({c: "attn.q", b: "mlp.up"}) == [[c], [b]]
    assert stops.find({c: "attn.q"}) is None  # not the same layers
    stops.learn({a: "x"}, [[b]])  # a group outside the layout teaches nothing
    assert stops.find({a: "x"}) is None


@pytest.mark.parametrize("calibration,error,message", [
    (torch.rand(2, 16), TypeError, "must be token ids \\(an integer tensor\\), got torch.float32"),
    (torch.full((2, 16), 128), ValueError, "token id 128, outside the model's vocabulary of 128 ids"),
    (torch.full((2, 16), -1), ValueError, "token id -1, outside"),
    (torch.zeros(2, 1, dtype=torch.long), ValueError, "at least 2 tokens per window"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "at least 2 tokens per window"),
])
def test_api_calibration_is_checked_against_the_model(calibration, error, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        sparsetorch.prune(model, calibration, method="wanda", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_every_layer_that_cannot_take_the_pattern_is_named():
    with pytest.raises(ValueError, match=r"14 layer\(s\) cannot take 2:3: leave them dense with ignore=\["):
        sparsetorch.prune(tiny_llama(), calibration_ids(), method="sparsegpt", pattern="2:3", progress=False)


def test_falcon_linears_are_linears():
    """FalconLinear subclasses nn.Linear: the default targets ('Linear') pick it."""
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           new_decoder_architecture=False)).eval()
    report = sparsetorch.prune(model, calibration_ids(), method="wanda", pattern="2:4", progress=False)
    kinds = {type(model.get_submodule(name)).__name__ for name in report.layers}
    assert kinds == {"FalconLinear"} and len(report.layers) == 2 * 4
    assert report.sparsity == 0.5
