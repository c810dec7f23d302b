import dataclasses
from typing import ClassVar

import pytest
import torch

from sparsetorch.training import RigL, Schedule, register_method, schedule_from_dict
from sparsetorch.training.method import Layer, Method, kept_magnitude, method_for


def test_kept_magnitude_ranks_pruned_weights_last():
    scores = kept_magnitude(torch.tensor([-3.0, 0.5, 2.0]), torch.tensor([True, False, True]))
    assert scores.tolist() == [3.0, float("-inf"), 2.0]


def test_a_conv1d_layer_reads_its_weight_transposed():
    class Conv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(3, 2))  # (in, out)

    layer = Layer("c", Conv1D(), 0.5)
    assert layer.transposed and layer.matrix(layer.weight).shape == (2, 3)


def test_schedules_round_trip_through_plain_dicts():
    config = RigL(sparsity=0.9, end=300, every=10)
    assert schedule_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown sparse-training method 'magic'; available: gradual"):
        schedule_from_dict({"method": "magic"})
    with pytest.raises(ValueError, match="unknown RigL fields"):
        schedule_from_dict({"method": "rigl", "sparsity": 0.5, "end": 3, "speed": 1})


def test_an_unregistered_config_says_what_to_write_and_duplicates_are_refused():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Movement(Schedule):
        name: ClassVar[str] = "movement-test"

    with pytest.raises(NotImplementedError, match="@register_method\\(Movement\\)"):
        method_for(Movement(sparsity=0.5))
    with pytest.raises(ValueError, match="already registered"):
        register_method(RigL)(Method)
