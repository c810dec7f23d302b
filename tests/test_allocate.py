"""How much sparsity each block gets: the rules by hand, and OWL end to end on a tiny model."""

import pytest
import torch

import sparsetorch
from conftest import calibration_ids, tiny_llama
from sparsetorch.allocate import check_spread, depth, outlier_ratio, owl, uniform


def test_outlier_ratio_counts_scores_above_m_times_their_mean():
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], m=2.0) == 0.25
    assert outlier_ratio([torch.ones(3), torch.tensor([[10.0]])], m=2.0) == 0.25  # over all layers together


@pytest.mark.parametrize("ratios", [[0.01, 0.02, 0.03], [0.5, 0.1, 0.3, 0.2, 0.9], [3.0, 1.0]])
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_keeps_the_mean_and_follows_the_outlier_ratios(ratios, target):
    sparsities = owl(ratios, target, lam=0.08)
    assert sum(sparsities) / len(sparsities) == pytest.approx(target)
    assert max(sparsities) - min(sparsities) == pytest.approx(2 * 0.08)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)  # more outliers, less sparsity


def test_owl_by_hand_and_with_equal_ratios():
    assert owl([0.01, 0.02, 0.03], target=0.7, lam=0.08) == pytest.approx([0.78, 0.7, 0.62])
    assert owl([0.2, 0.2], target=0.6, lam=0.08) == uniform(2, 0.6)


def test_depth_is_an_arithmetic_progression_around_the_target():
    assert depth(3, 0.5, 0.1) == pytest.approx([0.4, 0.5, 0.6])
    assert sum(depth(30, 0.7, 0.01)) / 30 == pytest.approx(0.7)
    with pytest.raises(ValueError, match="allocation='depth' gives a block sparsity of 1.000"):
        check_spread(depth(3, 0.9, 0.1), "allocation='depth'")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_prunes_blocks_to_their_allocated_sparsity_with_the_mean_at_the_target(method):
    torch.manual_seed(0)
    model = tiny_llama(layers=4)
    report = sparsetorch.prune(model, calibration_ids(), method=method, sparsity=0.6, allocation="owl",
                               owl_lambda=0.1, progress=False)
    per_block = [report.layers[f"model.layers.{i}.mlp.down_proj"].target_sparsity for i in range(4)]
    assert sum(per_block) / 4 == pytest.approx(0.6) and max(per_block) - min(per_block) == pytest.approx(0.2)
    for name, layer in report.layers.items():
        block = int(name.split(".")[2])
        assert layer.target_sparsity == per_block[block]
        assert layer.sparsity == pytest.approx(per_block[block], abs=1 / 64)
    assert report.to_dict()["layers"]["model.layers.0.mlp.up_proj"]["target_sparsity"] == per_block[0]


def test_an_explicit_map_overrides_and_fixed_patterns_refuse_allocations():
    report = sparsetorch.prune(tiny_llama(), method="magnitude", allocation="depth", depth_step=0.1,
                               layer_sparsity={"model.layers.0.mlp.down_proj": 0.25}, progress=False)
    assert report.layers["model.layers.0.mlp.down_proj"].sparsity == 0.25
    assert report.layers["model.layers.1.mlp.down_proj"].target_sparsity == pytest.approx(0.55)
    with pytest.raises(ValueError, match="pattern 2:4 fixes every layer's sparsity"):
        sparsetorch.PruneConfig(pattern="2:4", allocation="owl")
    with pytest.raises(ValueError, match="layer_sparsity names layers that are not pruned"):
        sparsetorch.prune(tiny_llama(), method="magnitude", layer_sparsity={"lm_head": 0.5}, progress=False)
    with pytest.raises(ValueError, match="allocation='owl' measures outliers on calibration data"):
        sparsetorch.prune(tiny_llama(), method="magnitude", allocation="owl", progress=False)


def test_a_whole_model_pass_takes_the_explicit_map_and_refuses_block_allocations():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    report = sparsetorch.prune(net, torch.randn(4, 8), method="wanda", targets=["Linear"],
                               layer_sparsity={"0": 0.25}, progress=False)
    assert report.layers["0"].sparsity == 0.25 and report.layers["2"].sparsity == 0.5
    with pytest.raises(ValueError, match="allocation='depth' spreads sparsity over decoder blocks"):
        sparsetorch.prune(net, torch.randn(4, 8), method="wanda", targets=["Linear"], allocation="depth",
                          progress=False)
