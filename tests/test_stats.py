import pytest
import torch

from sparsetorch.oneshot.stats import Gram, InputSqNorms


def test_gram_accumulates_xtx_over_batches():
    x = torch.randn(3, 50, 37)
    gram = Gram(37)
    for batch in x:
        gram.add_batch(batch)
    flat = x.reshape(-1, 37)
    torch.testing.assert_close(gram.value, flat.t() @ flat, rtol=1e-5, atol=1e-4)
    assert gram.tokens == 150
    torch.testing.assert_close(gram.input_sq_norms(), (flat**2).sum(0).double(), rtol=1e-5, atol=1e-4)


def test_input_norms_sum_squares_per_column():
    stat = InputSqNorms(2)
    stat.add_batch(torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]))
    assert stat.value.tolist() == [10.0, 4.0]


def test_every_statistic_gives_means_and_squared_norms():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [-1.0, 4.0]])
    for stat in (InputSqNorms(2), Gram(2)):
        stat.add_batch(x[:2])
        stat.add_batch(x[2:])
        assert stat.input_means().tolist() == [1.0, 2.0]
        assert stat.input_sq_norms().tolist() == [11.0, 20.0]
        assert stat.input_means().dtype == stat.input_sq_norms().dtype == torch.float64


def test_means_and_squared_norms_give_the_variance():
    x = torch.randn(4, 100, 7) * 3 + 2
    stat = Gram(7)
    for batch in x:
        stat.add_batch(batch)
    flat = x.reshape(-1, 7).double()
    variance = stat.input_sq_norms() / stat.tokens - stat.input_means().square()
    torch.testing.assert_close(stat.input_means(), flat.mean(0))
    torch.testing.assert_close(variance, flat.var(0, unbiased=False), rtol=1e-5, atol=1e-5)


def test_means_need_a_batch_first():
    with pytest.raises(ValueError, match="add_batch"):
        InputSqNorms(3).input_means()
