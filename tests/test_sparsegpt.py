"""SparseGPT against a direct OBS computation, and against Wanda and magnitude."""

import pytest
import torch

from sparsetorch.oneshot import sparsegpt
from sparsetorch.oneshot.sparsegpt import (
    inverse_hessian_factor,
    sparsegpt_prune,
    sparsegpt_prune_many,
    sweep_op,
    sweep_reference,
)
from sparsetorch.patterns import NM, Block, Unstructured, prune_count
from sparsetorch.scores import magnitude_scores, wanda_scores


def _calibration(tokens=2048, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.rand(cols, generator=g) * 4 + 0.1  # uneven columns, as in LLM activations
    return (torch.randn(tokens, cols, generator=g) @ mixing) * scales


def direct_obs(weight, gram, pattern, sparsity, block, dampening=0.01):
    """Column-by-column OBS with a fresh inverse of the remaining Hessian at every step:
    no Cholesky factor, no lazy batching, float64."""
    W = weight.double().clone()
    H = gram.double().clone()
    H.diagonal().add_(dampening * H.diagonal().mean())
    rows, cols = W.shape
    inverses = [torch.linalg.inv(H[i:, i:]) for i in range(cols)]
    d = torch.tensor([inv[0, 0] for inv in inverses], dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        if not isinstance(pattern, NM):
            n = pattern.slice_n_prune((rows, cols), sparsity, start, stop)
            keep[:, start:stop] = pattern.mask(W[:, start:stop] ** 2 / d[start:stop], sparsity, n_prune=n)
        for i in range(start, stop):
            if isinstance(pattern, NM) and (i - start) % pattern.m == 0:
                group = slice(i, i + pattern.m)
                keep[:, group] = pattern.mask(W[:, group] ** 2 / d[group])
            err = W[:, i] * (~keep[:, i]) / inverses[i][0, 0]
            W[:, i:] -= torch.outer(err, inverses[i][0])
    return (W * keep).float(), keep


@pytest.mark.parametrize("pattern,sparsity", [
    (Unstructured(), 0.5), (Unstructured(per_row=True), 0.6), (NM(2, 4), None), (Block(2, 4), 0.5),
])
def test_matches_direct_obs_computation(pattern, sparsity):
    X = _calibration()
    W = torch.randn(16, 32)
    gram = X.t() @ X
    ours, keep = sparsegpt_prune(W, gram, pattern, sparsity, block_size=8)
    expected, expected_keep = direct_obs(W, gram, pattern, pattern.resolve_sparsity(sparsity), block=8)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-4)


def test_unstructured_count_is_exact_across_lazy_blocks():
    X = _calibration(cols=40)
    W = torch.randn(10, 40)
    pruned, keep = sparsegpt_prune(W, X.t() @ X, Unstructured(), 0.7, block_size=16)
    assert int((~keep).sum()) == prune_count(400, 0.7)
    assert torch.equal(pruned == 0, ~keep)


def test_reconstruction_error_beats_wanda_and_magnitude():
    X = _calibration(tokens=4096, cols=64, seed=3)
    W = torch.randn(48, 64)
    gram = X.t() @ X

    def error(pruned):
        return float(((X @ (W - pruned).t()) ** 2).sum())

    for pattern in (Unstructured(per_row=True), NM(2, 4)):
        magnitude = W * pattern.mask(magnitude_scores(W), 0.5)
        wanda = W * pattern.mask(wanda_scores(W, (X**2).sum(0).double()), 0.5)
        sparsegpt, _ = sparsegpt_prune(W, gram, pattern, 0.5)
        assert error(sparsegpt) < error(wanda) < error(magnitude)


def test_dead_inputs_get_zero_weight():
    X = _calibration()
    X[:, 5] = 0
    pruned, _ = sparsegpt_prune(torch.randn(8, 32), X.t() @ X, NM(2, 4), None)
    assert (pruned[:, 5] == 0).all()


def test_bad_dampening_is_rejected():
    X = _calibration()
    with pytest.raises(ValueError, match="dampening must be > 0"):
        sparsegpt_prune(torch.randn(4, 32), X.t() @ X, NM(2, 4), None, dampening=0)


@pytest.mark.parametrize("pattern,sparsity", [(Unstructured(), 0.5), (NM(2, 4), None), (Block(2, 4), 0.6)])
def test_layers_sharing_an_input_give_the_same_result_stacked(pattern, sparsity):
    from sparsetorch.oneshot.sparsegpt import sparsegpt_prune_many

    X = _calibration()
    gram = X.t() @ X
    weights = [torch.randn(16, 32), torch.randn(6, 32), torch.randn(10, 32)]
    together = sparsegpt_prune_many(weights, gram, pattern, sparsity, block_size=8)
    for weight, (pruned, keep) in zip(weights, together):
        alone, alone_keep = sparsegpt_prune(weight, gram, pattern, sparsity, block_size=8)
        assert torch.equal(keep, alone_keep)
        torch.testing.assert_close(pruned, alone, rtol=1e-4, atol=1e-5)


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    x = _calibration(cols=48)
    gram = x.t() @ x
    U = inverse_hessian_factor(gram, 0.01).double()
    damped = gram.double() + 0.01 * gram.diagonal().double().mean() * torch.eye(48, dtype=torch.float64)
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(damped), rtol=1e-5, atol=1e-9)


# ---- the C++ sweep (kernels/csrc/sparsegpt.h) against its torch reference --------------

needs_sweep_op = pytest.mark.skipif(sweep_op() is None, reason="no C++ kernels on this machine")


def _sweep_inputs(width, out, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * width, width, generator=g) * (torch.rand(width, generator=g) * 3 + 0.1)
    hinv = inverse_hessian_factor(X.t() @ X, 0.01)
    block = torch.randn(width, out, generator=g)
    pruned = torch.rand(width, out, generator=g) < 0.6 if m == 0 else torch.zeros(width, out, dtype=torch.bool)
    return block, hinv, pruned


@needs_sweep_op
@pytest.mark.parametrize("n,m", [(2, 4), (1, 3), (4, 8), (0, 0)])
@pytest.mark.parametrize("width,out", [(24, 5), (48, 33), (96, 100)])
def test_sweep_op_matches_the_torch_sweep(n, m, width, out):
    block, hinv, pruned = _sweep_inputs(width, out, n, m)
    results = []
    for sweep in (sweep_reference, sweep_op()):
        b, p, e = block.clone(), pruned.clone(), torch.zeros(width, out)
        sweep(b, hinv, p, e, n, m)
        results.append((b, p, e))
    (b1, p1, e1), (b2, p2, e2) = results
    assert torch.equal(p1, p2)
    if m:
        assert torch.equal((~p2).sum(0), torch.full((out,), width // m * n))  # exactly n kept of every m
    torch.testing.assert_close(b2, b1, rtol=0, atol=1e-5)
    torch.testing.assert_close(e2, e1, rtol=0, atol=1e-4)
    assert torch.equal(b2[p2], torch.zeros(int(p2.sum())))
    assert not torch.signbit(b2[p2]).any()  # +0.0, never -0.0


@needs_sweep_op
@pytest.mark.parametrize("pattern,sparsity", [(NM(2, 4), None), (Unstructured(), 0.5), (Block(4, 4), 0.5)])
def test_sparsegpt_gives_the_same_layers_with_or_without_the_op(pattern, sparsity, monkeypatch):
    X = _calibration(cols=64)
    weights = [torch.randn(40, 64), torch.randn(24, 64)]
    gram = X.t() @ X
    with_op = sparsegpt_prune_many(weights, gram, pattern, sparsity, block_size=32)
    monkeypatch.setattr(sparsegpt, "_op_can_sweep", lambda *args: False)
    without = sparsegpt_prune_many(weights, gram, pattern, sparsity, block_size=32)
    for (w1, k1), (w2, k2) in zip(with_op, without):
        assert torch.equal(k1, k2)
        torch.testing.assert_close(w1, w2, rtol=0, atol=1e-5)


@needs_sweep_op
def test_sweep_op_refuses_bad_input():
    block, hinv, pruned = _sweep_inputs(8, 5, 2, 4)
    errors = torch.zeros(8, 5)
    with pytest.raises(RuntimeError, match="block and errors must be contiguous float32"):
        sweep_op()(block.double(), hinv, pruned, errors, 2, 4)
    with pytest.raises(RuntimeError, match="pruned must be a contiguous bool tensor"):
        sweep_op()(block, hinv, pruned.float(), errors, 2, 4)
    with pytest.raises(RuntimeError, match="hinv must be a .width, width. float32"):
        sweep_op()(block, hinv[:4, :4], pruned, errors, 2, 4)
    with pytest.raises(RuntimeError, match="N:M needs 0 < n < m"):
        sweep_op()(block, hinv, pruned, errors, 2, 3)  # 8 columns are not whole groups of 3
