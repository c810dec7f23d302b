import pytest
import torch

from sparsetorch.training.toys import DigitsCNN, DigitsMLP, TinyGPT


def test_shapes():
    assert DigitsCNN()(torch.rand(5, 64)).shape == (5, 10)
    assert DigitsMLP()(torch.rand(5, 64)).shape == (5, 10)
    assert TinyGPT(vocab=30, width=32, layers=2, heads=4, context=16)(torch.randint(0, 30, (3, 16))).shape == (3, 16, 30)


def test_gpt_is_causal():
    model = TinyGPT(vocab=30, width=32, layers=2, heads=4, context=16).eval()
    ids = torch.randint(0, 30, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 30
    assert torch.allclose(model(ids)[0, :10], model(changed)[0, :10])


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="heads must divide width"):
        TinyGPT(vocab=10, width=30, heads=4)
