import pytest
import torch

from sparsetorch.scores import magnitude_scores, random_scores, wanda_scores


def test_wanda_multiplies_magnitude_by_input_norm():
    scores = wanda_scores(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert scores.tolist() == [[2.0, 2.0], [6.0, 0.5]]


def test_wanda_rejects_norms_of_the_wrong_length():
    with pytest.raises(ValueError, match="one input norm per column"):
        wanda_scores(torch.rand(2, 3), torch.rand(4))


def test_magnitude_and_random_shapes():
    w = torch.tensor([[-3.0, 2.0]])
    assert magnitude_scores(w).tolist() == [[3.0, 2.0]]
    g = torch.Generator().manual_seed(0)
    assert random_scores(w, g).shape == w.shape
