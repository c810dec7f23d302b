"""DSnoT: refine a pruned layer's mask by prune-and-grow swaps, without training
(Zhang et al., "Dynamic Sparse No Training", ICLR 2024).

Per output row q, the expected reconstruction error of the pruned weights is

    eps_q = E[(w_dense - w) . x] = sum_j (w_dense - w)_qj * E[x_j]

and each cycle swaps one pruned weight back in against one kept weight out, both
chosen to push eps_q towards zero:

* grow the pruned weight r whose return shrinks eps_q the most for its input's
  variance: the largest sign(eps_q) * w_qr * E[x_r] / Var(x_r)^grow_var_power;
* prune (unstructured) the kept weight with the lowest Wanda score
  |w_qj| * ||X_j||_2 / Var(x_j)^prune_var_power among those whose removal also moves
  eps_q towards zero, sign(w_qj * E[x_j]) != sign(eps_q); for N:M, the lowest-scored
  originally kept weight in the M-group of the weight just grown, so every group keeps
  exactly N.

A row stops for good when |eps_q| falls to the update threshold, when it runs out of
candidates, or (N:M only) when a swap would flip eps_q's sign. Candidates are ranked
once, from the starting mask, and each is used at most once, so a weight never moves
twice. Swaps happen within a row: per-row, layer-wide and per-group counts stay exact.

The criterion is an expectation, a surrogate for the real error; a last check
(`_worse_rows`) keeps a refined row only where its error under the Gram matrix is
not higher than the starting row's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsetorch.checks import check_int
from sparsetorch.oneshot.stats import Gram
from sparsetorch.patterns import NM, Pattern, Unstructured

__all__ = ["dsnot"]

# The reference's (github.com/zyxxmu/DSnoT, main.py) defaults.
MAX_CYCLES = 50
UPDATE_THRESHOLD = 0.1
GROW_VAR_POWER = 1.0
PRUNE_VAR_POWER = 0.0
SEQUENCE_LENGTH = 2048


def dsnot(
    dense_weight: Tensor,
    weight: Tensor,
    keep: Tensor,
    stat: Gram,
    pattern: Pattern,
    *,
    max_cycles: int = MAX_CYCLES,
    update_threshold: float = UPDATE_THRESHOLD,
    grow_var_power: float = GROW_VAR_POWER,
    prune_var_power: float = PRUNE_VAR_POWER,
    sequence_length: int = SEQUENCE_LENGTH,
    stop_at_sign_flip: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Refine a pruned layer with DSnoT's training-free prune-and-grow swaps.

    The defaults are the paper's: 50 cycles at most, update threshold 0.1, growth
    scores divided by the input variance to the power 1, pruning scores not divided
    (the reference code accepts `--pow_of_var_pruning` but never reads it: its pruning
    score is plain Wanda). The reference sums inputs per 2048-token calibration
    sequence, so its threshold of 0.1 bounds the error summed over one such sequence:
    `sequence_length` keeps that meaning whatever the calibration windows here are.
    Unstructured rows run on past a sign flip of the error, N:M rows stop before one,
    as the reference does (its `--without_same_sign`, on by default, applies to its
    unstructured branch only); `stop_at_sign_flip` overrides that for both.
    Variances are over all calibration tokens; the reference averages per-batch ones.

    Started from SparseGPT, the reference never applies SparseGPT's weight update: it
    takes SparseGPT's saliency for the starting mask, ranks every swap on the original
    weights, and ends with the original weights under the refined mask, so a regrown
    weight comes back at its dense value. Here too a regrown weight takes its dense
    value, and growth ranks on it; weights that stay kept keep `weight`'s (updated)
    values, and the error and pruning scores read the weights actually held. For
    Wanda or magnitude, where `weight == dense_weight * keep`, this is the reference.

    Args:
        dense_weight: (out, in) weights before pruning.
        weight: (out, in) what the pruning method returned, zero where ~keep.
        keep: (out, in) bool, the starting mask (True = kept).
        stat: the layer input's Gram statistic: means and variances for the criteria,
            X^T X for the final no-worse check.
        pattern: the mask's pattern, unstructured (layer-wide or per row) or N:M.
        max_cycles: swaps per row at most.
        update_threshold: a row stops once its expected error over `sequence_length`
            tokens is at most this.
        grow_var_power: power of Var(x_j) dividing the growth score.
        prune_var_power: power of Var(x_j) dividing the pruning score.
        sequence_length: tokens the threshold's error is summed over.
        stop_at_sign_flip: stop a row before a swap that flips its error's sign; None
            follows the reference (N:M only).

    Returns:
        (new_weight, new_keep): float32 weights, +0.0 exactly where ~new_keep, and the
        refined mask, with the same per-row (and per-group) counts as `keep`.

    Raises:
        ValueError: a block or unknown pattern, mismatched shapes, a negative option.
        TypeError: `stat` is not a Gram statistic.

    Example:
        >>> weight, keep = sparsegpt_prune(dense, gram.value, NM(2, 4), None)
        >>> weight, keep = dsnot(dense, weight, keep, gram, NM(2, 4))
    """
    _check(dense_weight, weight, keep, stat, pattern, max_cycles, update_threshold, sequence_length)
    dense = dense_weight.detach().float()
    start = weight.detach().float().masked_fill(~keep, 0.0)
    scores = _Scores(dense, start, keep, stat, grow_var_power, prune_var_power)
    threshold = update_threshold / sequence_length
    k = min(max_cycles, dense.shape[1])
    nm = isinstance(pattern, NM)
    stop_at_flip = nm if stop_at_sign_flip is None else stop_at_sign_flip
    if nm:
        steps = _nm_cycles(scores, keep, pattern.m, k, threshold, stop_at_flip)
    else:
        steps = _unstructured_cycles(scores, keep, k, threshold, stop_at_flip)
    rows, grown, pruned = _swaps(steps, dense.device)
    new_keep, refined = keep.clone(), start.clone()
    new_keep[rows, grown] = True
    new_keep[rows, pruned] = False
    refined[rows, grown] = dense[rows, grown]  # a regrown weight comes back at its dense value
    refined[rows, pruned] = 0.0
    worse = _worse_rows(dense, start, refined, stat.value.to(dense.device)).unsqueeze(1)  # (out, 1)
    return torch.where(worse, start, refined), torch.where(worse, keep, new_keep)


def _check(dense: Tensor, weight: Tensor, keep: Tensor, stat: Gram, pattern: Pattern, max_cycles: int,
           update_threshold: float, sequence_length: int) -> None:
    if not isinstance(pattern, (Unstructured, NM)):
        raise ValueError(
            f"DSnoT refines 'unstructured', 'unstructured-row' and N:M (e.g. '2:4') masks, got {pattern.spec}: "
            "its swaps move single weights, which a block pattern cannot"
        )
    if dense.dim() != 2 or dense.shape != weight.shape or dense.shape != keep.shape:
        raise ValueError(
            "dense_weight, weight and keep must be (out, in) matrices of one shape, got "
            f"{tuple(dense.shape)}, {tuple(weight.shape)}, {tuple(keep.shape)}"
        )
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask (True = kept), got dtype {keep.dtype}")
    pattern.check_shape(dense.shape)
    if not isinstance(stat, Gram):
        raise TypeError(
            f"DSnoT needs the layer input's Gram statistic (X^T X) for its no-worse check, got {type(stat).__name__}; "
            "collect sparsetorch.oneshot.Gram"
        )
    if stat.columns != dense.shape[1]:
        raise ValueError(f"the statistic has {stat.columns} input columns, the weight {dense.shape[1]}")
    check_int(max_cycles, "max_cycles", 0)  # swaps per row at most
    if not update_threshold >= 0:
        raise ValueError(f"update_threshold must be >= 0 (an expected error), got {update_threshold}")
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1 token, got {sequence_length}")


Steps = list[tuple[Tensor, Tensor, Tensor]]  # per cycle: grown column, pruned column, swapped; (out, 1) each


class _Scores:
    """What the criteria read, (out, in) float32 each.

    `grown`: the expected error eps falls by this when a pruned weight comes back at its
    dense value. `pruned`: eps rises by this when a kept weight, as held, is pruned.
    `grow_key`: growth rank, kept weights 0 (larger |key| first, sign as `grown`).
    `prune_key`: 1 / pruning score on kept weights, 0 elsewhere (larger first): the
    reciprocal ranks smallest score first with 0 free to mark non-candidates.
    """

    def __init__(self, dense: Tensor, start: Tensor, keep: Tensor, stat: Gram, grow_power: float,
                 prune_power: float) -> None:
        device = dense.device
        means, sq_norms = stat.input_means(), stat.input_sq_norms()  # (in,) float64
        variances = (sq_norms / stat.tokens - means.square()).clamp_min(0.0)
        grow_scale = variances.pow(-grow_power).float().to(device)  # inf on a constant input: grown first
        prune_scale = (sq_norms.sqrt() * variances.pow(-prune_power)).float().to(device)
        means = means.float().to(device)
        self.grown = dense * means
        self.pruned = start * means
        self.error = (dense - start) @ means  # (out,) eps per token
        finite = torch.finfo(torch.float32).max  # nan (0 * inf) only on kept or zero-mean weights: no candidate
        self.grow_key = torch.nan_to_num(self.grown * grow_scale * (~keep).float(), nan=0.0, posinf=finite,
                                         neginf=-finite)
        tiny = torch.finfo(torch.float32).tiny
        self.prune_key = torch.nan_to_num(keep.float() / (start.abs() * prune_scale).clamp_min(tiny), nan=0.0)


class _Ranked:
    """Per row and list, the best `k` candidates, handed out front to back.

    Candidates are ranked once, at the start, as in the reference; only a top-k is kept
    because a row takes at most `k` from any list. Each cycle a row reads the lists that
    suit the sign of its error.
    """

    def __init__(self, keys: Tensor, k: int) -> None:
        """keys: (out, lists, in), candidates > 0, the largest first."""
        self.k = k
        self.index = torch.topk(keys, k, dim=2).indices.flatten(1)  # (out, lists * k)
        self.count = (keys > 0).sum(dim=2).clamp(max=k)  # (out, lists)
        self.next = torch.zeros_like(self.count)

    def head(self, lists: Tensor) -> tuple[Tensor, Tensor]:
        """(columns, available), shaped like `lists` (out, n): the next candidate of each."""
        taken = self.next.gather(1, lists)
        columns = self.index.gather(1, lists * self.k + taken.clamp(max=self.k - 1))
        return columns, taken < self.count.gather(1, lists)

    def pop(self, lists: Tensor, rows: Tensor) -> None:
        """Move past the head of `lists` on `rows` (out, 1)."""
        # elementwise, not scatter_add_: a few thousand entries, below torch's parallel grain,
        # where a parallel region per cycle would wait on busy cores
        picked = (lists.unsqueeze(2) == torch.arange(self.count.shape[1], device=lists.device)).any(dim=1)
        self.next += picked & rows


def _unstructured_cycles(scores: _Scores, keep: Tensor, k: int, threshold: float, stop_at_flip: bool) -> Steps:
    """Swap one pruned and one kept weight per row and cycle, both reducing |eps|.

    Unless `stop_at_flip`, the error may change sign on the way (the reference's
    unstructured default): the next cycle then works from the other side.
    """
    if k == 0:
        return []
    # lists: grow for eps > 0, grow for eps <= 0, prune for eps > 0, prune for eps <= 0
    keys = torch.empty(keep.shape[0], 4, keep.shape[1], device=keep.device)  # (out, lists, in)
    keys[:, 0] = scores.grow_key
    torch.neg(scores.grow_key, out=keys[:, 1])
    torch.mul(scores.prune_key, scores.pruned < 0, out=keys[:, 2])  # pruning these lowers eps > 0
    torch.mul(scores.prune_key, scores.pruned > 0, out=keys[:, 3])
    ranked = _Ranked(keys, k)
    pair = torch.tensor([[0, 2]], device=keep.device)
    eps = scores.error.unsqueeze(1)  # (out, 1)
    first_sign = eps.sign()
    running = eps.abs() > threshold
    steps = []
    for _ in range(k):
        lists = (eps <= 0).long() + pair  # (out, 2): this row's grow and prune lists
        columns, available = ranked.head(lists)
        grow, prune = columns.split(1, dim=1)
        after = eps + scores.pruned.gather(1, prune) - scores.grown.gather(1, grow)
        running &= available.all(dim=1, keepdim=True) & (eps.abs() > threshold)
        if stop_at_flip:
            running &= after.sign() == first_sign
        if not running.any():
            break
        ranked.pop(lists, running)
        eps = torch.where(running, after, eps)
        steps.append((grow, prune, running.clone()))
    return steps


def _nm_cycles(scores: _Scores, keep: Tensor, m: int, k: int, threshold: float, stop_at_flip: bool) -> Steps:
    """Grow one weight per row and cycle and prune the lowest-scored originally kept
    weight of its M-group, so every group keeps its count.

    With `stop_at_flip` (the reference's N:M rule) a row stops before a swap that would
    flip its error's sign, so it only needs growth candidates for its starting sign.
    A grown weight whose group has nothing left to prune is passed over.
    """
    if k == 0:
        return []
    eps = scores.error.unsqueeze(1)  # (out, 1)
    first_sign = eps.sign()
    if stop_at_flip:  # one list, for the starting sign
        growers = _Ranked((first_sign * scores.grow_key).unsqueeze(1), k)
    else:  # grow for eps > 0, grow for eps <= 0
        growers = _Ranked(torch.stack([scores.grow_key, -scores.grow_key], dim=1), k)
    prunable = scores.prune_key.clone()  # 0 once pruned: a weight moves at most once
    offsets = torch.arange(m, device=keep.device)
    running = eps.abs() > threshold
    steps = []
    for _ in range(k):
        lists = torch.zeros_like(eps, dtype=torch.long) if stop_at_flip else (eps <= 0).long()
        grow, grow_ok = growers.head(lists)
        running &= grow_ok & (eps.abs() > threshold)
        group = grow - grow % m + offsets  # (out, m): the grown weight's group
        best, at = prunable.gather(1, group).max(dim=1, keepdim=True)
        prune, prune_ok = group.gather(1, at), best > 0
        after = eps + scores.pruned.gather(1, prune) - scores.grown.gather(1, grow)
        if stop_at_flip:
            running &= ~prune_ok | (after.sign() == first_sign)
        if not running.any():
            break
        swap = running & prune_ok
        growers.pop(lists, running)
        prunable.scatter_(1, prune, torch.where(swap, 0.0, best))
        eps = torch.where(swap, after, eps)
        steps.append((grow, prune, swap))
    return steps


def _swaps(steps: Steps, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, grown columns, pruned columns) of every swap made, flat."""
    if not steps:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    grow, prune, swapped = (torch.cat(parts, dim=1) for parts in zip(*steps))  # (out, cycles)
    rows = torch.arange(grow.shape[0], device=grow.device).unsqueeze(1).expand_as(grow)
    return rows[swapped], grow[swapped], prune[swapped]


def _worse_rows(dense: Tensor, start: Tensor, refined: Tensor, gram: Tensor) -> Tensor:
    """(out,) bool: rows whose error (w - w_dense) H (w - w_dense)^T grew with refining.

    With d = start - dense and D = refined - start, the change is D H (2d + D)^T: one
    product, in float64 so that "not higher" holds for H as given, not just up to
    float32 rounding. Taking the difference directly, rather than two errors, also
    leaves unchanged rows (D = 0) at exactly 0.
    """
    step = (refined - start).double()  # (out, in), nonzero only where swapped
    return ((2 * (start - dense).double() + step) @ gram.double()).mul_(step).sum(dim=1) > 0
