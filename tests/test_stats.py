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
