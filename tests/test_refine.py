"""DSnoT refinement: exact counts, a consistent mask and weight, and never a higher error."""

import pytest
import torch

from sparsetorch.oneshot.refine import dsnot
from sparsetorch.oneshot.sparsegpt import sparsegpt_prune
from sparsetorch.oneshot.stats import Gram, InputSqNorms
from sparsetorch.patterns import NM, Block, Unstructured
from sparsetorch.scores import wanda_scores

PATTERNS = [Unstructured(), Unstructured(per_row=True), NM(2, 4), NM(4, 8)]


def _gram(cols, seed, mean=1.0, tokens=512):
    """Correlated inputs with uneven scales and nonzero means, in two batches."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.rand(cols, generator=g) + 0.2
    means = torch.randn(cols, generator=g) * mean
    x = (torch.randn(tokens, cols, generator=g) @ mixing) * scales + means
    stat = Gram(cols)
    for batch in x.chunk(2):
        stat.add_batch(batch)
    return stat


def _wanda_start(dense, stat, pattern):
    keep = pattern.mask(wanda_scores(dense, stat.input_sq_norms()), 0.5)
    return dense.masked_fill(~keep, 0.0), keep


def _row_errors(weight, dense, stat):
    """(w - w_dense) H (w - w_dense)^T per row, float64."""
    diff = (weight - dense).double()
    return ((diff @ stat.value.double()) * diff).sum(dim=1)


def _assert_counts(keep, start_keep, pattern):
    assert torch.equal(keep.sum(dim=1), start_keep.sum(dim=1))  # swaps stay within a row
    if isinstance(pattern, NM):
        assert (keep.view(keep.shape[0], -1, pattern.m).sum(dim=-1) == pattern.n).all()


def _assert_consistent(weight, keep, dense, start_weight, start_keep):
    assert weight.dtype == torch.float32 and keep.dtype == torch.bool
    pruned = weight[~keep]
    assert torch.equal(pruned, torch.zeros_like(pruned)) and not pruned.signbit().any()  # exactly +0.0
    stayed, regrown = keep & start_keep, keep & ~start_keep
    assert torch.equal(weight[stayed], start_weight[stayed])
    assert torch.equal(weight[regrown], dense[regrown])


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.spec)
@pytest.mark.parametrize("shape", [(24, 64), (40, 96)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refined_rows_are_never_worse_and_counts_are_exact(pattern, shape, seed):
    torch.manual_seed(seed)
    stat = _gram(shape[1], seed)
    dense = torch.randn(shape) / shape[1] ** 0.5
    start_weight, start_keep = _wanda_start(dense, stat, pattern)
    weight, keep = dsnot(dense, start_weight, start_keep, stat, pattern)
    before, after = _row_errors(start_weight, dense, stat), _row_errors(weight, dense, stat)
    assert (after <= before * (1 + 1e-9)).all()
    _assert_counts(keep, start_keep, pattern)
    _assert_consistent(weight, keep, dense, start_weight, start_keep)


@pytest.mark.parametrize("stop_at_sign_flip", [None, True])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.spec)
def test_refinement_changes_the_mask_and_lowers_the_error_when_inputs_have_large_means(pattern, stop_at_sign_flip):
    # Means far above the spread: the expected error DSnoT balances is most of the real one.
    stat = _gram(64, seed=3, mean=4.0)
    dense = torch.randn(32, 64) / 8
    start_weight, start_keep = _wanda_start(dense, stat, pattern)
    weight, keep = dsnot(dense, start_weight, start_keep, stat, pattern, stop_at_sign_flip=stop_at_sign_flip)
    before, after = _row_errors(start_weight, dense, stat), _row_errors(weight, dense, stat)
    changed = (keep != start_keep).any(dim=1)
    assert changed.sum() >= 2
    assert (after[changed] < before[changed]).all()
    assert after.sum() < 0.9 * before.sum()


def test_default_unstructured_rows_may_run_past_a_sign_flip():
    stat = _gram(64, seed=3, mean=4.0)
    dense = torch.randn(32, 64) / 8
    start_weight, start_keep = _wanda_start(dense, stat, Unstructured(per_row=True))
    loose = dsnot(dense, start_weight, start_keep, stat, Unstructured(per_row=True), update_threshold=0.0)
    strict = dsnot(dense, start_weight, start_keep, stat, Unstructured(per_row=True), update_threshold=0.0,
                   stop_at_sign_flip=True)
    assert not torch.equal(loose[1], strict[1])


def test_starting_from_sparsegpt_keeps_its_updates_and_regrows_dense_values():
    stat = _gram(64, seed=4, mean=4.0)
    dense = torch.randn(32, 64) / 8
    regrown = 0
    for pattern in PATTERNS:
        start_weight, start_keep = sparsegpt_prune(dense, stat.value, pattern, 0.5)
        weight, keep = dsnot(dense, start_weight, start_keep, stat, pattern, stop_at_sign_flip=True)
        before, after = _row_errors(start_weight, dense, stat), _row_errors(weight, dense, stat)
        assert (after <= before * (1 + 1e-9)).all()
        _assert_counts(keep, start_keep, pattern)
        _assert_consistent(weight, keep, dense, start_weight, start_keep)
        regrown += int((keep & ~start_keep).sum())
    assert regrown > 0  # SparseGPT leaves DSnoT little to do, but the regrowth path runs


def test_no_cycles_or_a_high_threshold_returns_the_start():
    stat = _gram(32, seed=5)
    dense = torch.randn(8, 32)
    start_weight, start_keep = _wanda_start(dense, stat, NM(2, 4))
    for options in ({"max_cycles": 0}, {"update_threshold": 1e30}):
        weight, keep = dsnot(dense, start_weight, start_keep, stat, NM(2, 4), **options)
        assert torch.equal(keep, start_keep) and torch.equal(weight, start_weight)


def test_block_patterns_are_refused_naming_the_supported_ones():
    stat = _gram(16, seed=6)
    dense = torch.randn(8, 16)
    keep = Block(4, 4).mask(dense.abs(), 0.5)
    with pytest.raises(ValueError, match=r"'unstructured', 'unstructured-row' and N:M .* got block-4x4"):
        dsnot(dense, dense * keep, keep, stat, Block(4, 4))


def test_needs_the_gram_statistic():
    stat = InputSqNorms(16)
    stat.add_batch(torch.randn(32, 16))
    dense = torch.randn(8, 16)
    keep = Unstructured().mask(dense.abs(), 0.5)
    with pytest.raises(TypeError, match="Gram"):
        dsnot(dense, dense * keep, keep, stat, Unstructured())


def test_mismatched_shapes_are_refused():
    stat = _gram(16, seed=7)
    dense = torch.randn(8, 16)
    keep = Unstructured().mask(dense.abs(), 0.5)
    with pytest.raises(ValueError, match="one shape"):
        dsnot(dense, dense[:4], keep, stat, Unstructured())
    with pytest.raises(ValueError, match="16 input columns"):
        dsnot(dense[:, :8], (dense * keep)[:, :8], keep[:, :8], stat, Unstructured())
