"""Which modules are pruned: `targets` / `ignore` patterns, and weights as (out, in) matrices."""

import pytest
import torch
from torch import nn

from sparsetorch.targets import find_targets, matches, set_weight_matrix, weight_matrix


class FamilyLinear(nn.Linear):
    """A model family's own Linear subclass (Falcon's FalconLinear, say)."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = FamilyLinear(4, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.lm_head = nn.Linear(8, 4)


def test_a_class_name_matches_the_class_and_its_subclasses():
    net = Net()
    assert matches("up", net.up, ["Linear"]) and matches("up", net.up, ["FamilyLinear"])
    assert not matches("mlp.0", net.mlp[0], ["FamilyLinear"])
    assert list(find_targets(net)) == ["up", "mlp.0"]  # default: every Linear, lm_head ignored


def test_names_match_exactly_or_as_a_dotted_suffix_and_regexes_match_whole_names():
    layer = nn.Linear(2, 2)
    assert matches("model.lm_head", layer, ["lm_head"]) and not matches("model.xlm_head", layer, ["lm_head"])
    assert matches("mlp.0", layer, ["re:mlp\\..*"]) and not matches("xmlp.0", layer, ["re:mlp\\..*"])


def test_nothing_matched_lists_the_layers_that_could_be():
    with pytest.raises(ValueError, match="match no prunable layer; prunable layers are: up, mlp.0, lm_head"):
        find_targets(Net(), targets=["re:attn.*"])
    with pytest.raises(ValueError, match="bad regular expression in targets"):
        find_targets(Net(), targets=["re:("])


def test_weight_matrix_round_trip_bumps_the_version():
    layer = nn.Linear(3, 2)
    version = layer.weight._version
    set_weight_matrix(layer, torch.ones(2, 3))
    assert torch.equal(weight_matrix(layer), torch.ones(2, 3)) and layer.weight._version > version
