import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetorch.patterns import NM, Block, Unstructured, check_sparsity, parse_pattern, prune_count


def test_nm_keeps_the_largest_two_of_every_four():
    scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8]])
    assert NM(2, 4).mask(scores).int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]


def test_nm_groups_run_along_the_input_dimension():
    scores = torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4]])
    assert NM(1, 4).mask(scores).int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]


def test_unstructured_prunes_exactly_floor_of_sparsity_times_n():
    scores = torch.tensor([[5.0, 1, 4], [2, 6, 3]])
    keep = Unstructured().mask(scores, 0.5)
    assert keep.int().tolist() == [[1, 0, 1], [0, 1, 0]]
    assert (~Unstructured().mask(torch.rand(7, 11), 0.7)).sum() == prune_count(77, 0.7) == 53


def test_per_row_unstructured_gives_every_row_the_same_count():
    keep = Unstructured(per_row=True).mask(torch.rand(5, 10), 0.3)
    assert keep.sum(dim=1).tolist() == [7] * 5


def test_block_prunes_whole_tiles_ranked_by_their_sum():
    scores = torch.tensor([[1.0, 1, 9, 9], [1, 1, 9, 9]])
    assert Block(2, 2).mask(scores, 0.5).int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_conv_weights_group_input_channels():
    scores = torch.rand(3, 8, 2, 2)  # (out, in, kh, kw)
    keep = NM(2, 4).mask(scores)
    assert keep.shape == scores.shape
    groups = keep.movedim(1, -1).reshape(-1, 4)
    assert (groups.sum(dim=1) == 2).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range_is_rejected_with_the_allowed_range(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        check_sparsity(bad)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4), (-1, 2)])
def test_n_not_below_m_is_rejected(n, m):
    with pytest.raises(ValueError, match="0 < N < M"):
        NM(n, m)


def test_input_dimension_not_divisible_by_m_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        NM(2, 4).mask(torch.rand(2, 6))


def test_block_shape_must_tile_the_weight():
    with pytest.raises(ValueError, match="divisible"):
        Block(4, 4).mask(torch.rand(6, 8), 0.5)


def test_nm_rejects_a_conflicting_sparsity():
    with pytest.raises(ValueError, match="always gives sparsity 0.5"):
        NM(2, 4).mask(torch.rand(2, 8), 0.7)


@pytest.mark.parametrize("spec,expected", [
    ("unstructured", Unstructured()), ("row", Unstructured(per_row=True)),
    ("unstructured-row", Unstructured(per_row=True)), ("2:4", NM(2, 4)), ("1:8", NM(1, 8)),
    ("block-4x2", Block(4, 2)), ("4x2", Block(4, 2)),
])
def test_parse_pattern_round_trips(spec, expected):
    assert parse_pattern(spec) == expected
    assert parse_pattern(expected.spec) == expected


def test_unknown_pattern_names_the_allowed_forms():
    with pytest.raises(ValueError, match="'2:4'.*'block-4x4'"):
        parse_pattern("diagonal")


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_unstructured_is_exact_for_any_shape(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    assert int((~Unstructured().mask(scores, sparsity)).sum()) == prune_count(rows * cols, sparsity)
    per_row = ~Unstructured(per_row=True).mask(scores, sparsity)
    assert (per_row.sum(dim=1) == prune_count(cols, sparsity)).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 7), extra=st.integers(1, 8), groups=st.integers(1, 6), rows=st.integers(1, 5))
def test_nm_is_exact_for_any_n_below_m(n, extra, groups, rows):
    m = n + extra
    keep = NM(n, m).mask(torch.rand(rows, m * groups))
    assert (keep.reshape(-1, m).sum(dim=1) == n).all()


def test_slice_budgets_add_up_to_the_layer_count():
    shape = (10, 300)
    for pattern in (Unstructured(), Unstructured(per_row=True)):
        total = sum(pattern.slice_n_prune(shape, 0.7, a, min(a + 128, 300)) for a in range(0, 300, 128))
        expected = prune_count(3000, 0.7) if not pattern.per_row else prune_count(300, 0.7)
        assert total == expected
    tiles = sum(Block(2, 4).slice_n_prune(shape, 0.7, a, min(a + 128, 300)) for a in range(0, 300, 128))
    assert tiles == prune_count(5 * 75, 0.7)


def test_ties_at_the_cut_drop_the_first_ones_and_exactly_the_count():
    """Scores equal to the cut are dropped first-come along the selection, so every mask drops exactly
    the count asked for, whatever the ties (bf16 weights have many)."""
    from sparsetorch.patterns import _keep_top

    assert _keep_top(torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0, 5.0]), 2).tolist() == [True, False, False, True, True, True]
    rows = torch.tensor([[1.0, 1.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    assert _keep_top(rows, 2, dim=1).tolist() == [[False, True, True, False], [True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = torch.randint(0, 4, (7, 9), generator=g).float()
        k = int(torch.randint(0, 10, (), generator=g))
        keep = _keep_top(scores, k, dim=1)
        assert ((~keep).sum(1) == k).all()
        for row, kept in zip(scores, keep):
            if 0 < k < 9:
                assert row[kept].min() >= row[~kept].max()


def test_ties_at_the_cut_along_any_dim_are_dropped_first_come():
    """The dropped ties are the first ones along the selected dim, in every slice, for any dim and rank:
    checked against a running count of the ties."""
    from sparsetorch.patterns import _keep_top

    g = torch.Generator().manual_seed(1)
    for shape, dim in [((5, 8), 0), ((5, 8), 1), ((3, 4, 6), 1), ((3, 4, 6), -1), ((40,), 0)]:
        scores = torch.randint(0, 3, shape, generator=g).float()
        k = shape[dim] // 2
        cut = scores.kthvalue(k, dim=dim, keepdim=True).values
        below = (scores < cut).sum(dim, keepdim=True)
        ties = scores == cut
        expected = (scores > cut) | (ties & (ties.cumsum(dim) > k - below))
        assert torch.equal(_keep_top(scores, k, dim=dim), expected)
