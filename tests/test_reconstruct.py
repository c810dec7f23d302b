"""Reconstruction after masking (`sparsetorch.oneshot.reconstruct`): the layer refit against exact
least squares and its never-worse guarantee, and the block fit on tiny blocks."""

from functools import partial

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from sparsetorch.models.llama import LeanLlama
from sparsetorch.models.packed import PackedWeights
from sparsetorch.oneshot.reconstruct import BlockFit, reconstruct_block, refit_layer
from sparsetorch.oneshot.sparsegpt import sparsegpt_prune
from sparsetorch.patterns import NM, Unstructured
from sparsetorch.scores import wanda_scores

# ---------------------------------------------------------------- layers


def _gram(columns: int, seed: int, tokens: int = 512) -> torch.Tensor:
    """X^T X of correlated inputs with a few outlier columns, as LLM layer inputs have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    x = torch.randn(tokens, columns, generator=generator) @ mixing
    x[:, torch.randperm(columns, generator=generator)[:3]] *= 20.0
    return x.t() @ x


def _row_errors(weight: torch.Tensor, dense: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per row, the undamped output error (w - dense) H (w - dense)^T, in float64."""
    error = (weight - dense).double()
    return ((error @ gram.double()) * error).sum(1)


def _start(method: str, dense: torch.Tensor, gram: torch.Tensor, pattern) -> tuple[torch.Tensor, torch.Tensor]:
    sparsity = None if isinstance(pattern, NM) else 0.6
    if method == "sparsegpt":
        return sparsegpt_prune(dense, gram, pattern, sparsity)
    keep = pattern.mask(wanda_scores(dense, gram.diagonal().double()), sparsity)
    return dense.masked_fill(~keep, 0.0), keep


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [Unstructured(per_row=True), NM(2, 4)], ids=str)
@pytest.mark.parametrize(("rows", "columns"), [(48, 32), (24, 64), (64, 64)])
def test_refit_never_worsens_a_row_and_keeps_the_mask(rows, columns, pattern, method, seed):
    torch.manual_seed(seed)
    dense, gram = torch.randn(rows, columns), _gram(columns, seed)
    start, keep = _start(method, dense, gram, pattern)
    refit = refit_layer(dense, start, keep, gram)
    assert refit.dtype == torch.float32 and refit.shape == dense.shape
    pruned = refit[~keep]
    assert torch.equal(pruned, torch.zeros_like(pruned)) and not pruned.signbit().any()  # exactly +0.0
    before, after = _row_errors(start, dense, gram), _row_errors(refit, dense, gram)
    assert (after <= before * (1 + 1e-5)).all()  # to the float32 rounding of the error itself
    if method == "wanda":  # the refit has something to do, and does it
        assert after.sum() < 0.7 * before.sum()


def test_refit_solves_each_rows_least_squares_on_its_own_support():
    dense, gram = torch.randn(12, 24), _gram(24, seed=3)
    start, keep = _start("wanda", dense, gram, Unstructured(per_row=True))
    refit = refit_layer(dense, start, keep, gram, dampening=0.01, iterations=200, tolerance=0)
    damped = gram.double() + 0.01 * gram.diagonal().mean().double() * torch.eye(24, dtype=torch.float64)
    for r in range(12):
        kept = keep[r]
        # zero gradient on the support: (w - dense) H_d restricted to kept columns
        expected = torch.linalg.solve(damped[kept][:, kept], (dense[r].double() @ damped)[kept])
        torch.testing.assert_close(refit[r, kept].double(), expected, rtol=1e-3, atol=1e-4)


def test_with_uncorrelated_inputs_the_refit_is_the_dense_weights_on_the_support():
    dense = torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, 6.0, -7.0, 8.0]])
    keep = torch.tensor([[False, False, True, True], [True, False, False, True]])
    gram = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # nothing couples the columns: nothing to make up
    start = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    refit = refit_layer(dense, start, keep, gram)
    torch.testing.assert_close(refit, torch.tensor([[0.0, 0.0, 3.0, -4.0], [5.0, 0.0, 0.0, 8.0]]))


def test_a_row_the_refit_cannot_improve_keeps_its_start():
    dense, gram = torch.randn(8, 16), _gram(16, seed=4)
    start, keep = _start("wanda", dense, gram, NM(2, 4))
    optimum = refit_layer(dense, start, keep, gram, iterations=200, tolerance=0)
    again = refit_layer(dense, optimum, keep, gram)
    torch.testing.assert_close(again, optimum, rtol=0, atol=1e-6)
    assert torch.equal(refit_layer(dense, start, keep, gram, iterations=0), start)


def test_refit_refuses_bad_arguments():
    dense, keep, gram = torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool), torch.eye(8)
    with pytest.raises(ValueError, match="one \\(out, in\\) shape"):
        refit_layer(dense, dense, keep[:, :4], gram)
    with pytest.raises(ValueError, match="gram must be \\(in, in\\) = \\(8, 8\\)"):
        refit_layer(dense, dense, keep, torch.eye(4))
    with pytest.raises(ValueError, match="dampening must be > 0"):
        refit_layer(dense, dense, keep, gram, dampening=0.0)
    assert torch.equal(refit_layer(dense, dense, keep, torch.zeros(8, 8)), dense)  # no data: nothing to fit


# ---------------------------------------------------------------- blocks


def _prune_half(layers: list[nn.Linear]) -> dict[nn.Module, torch.Tensor]:
    """Keep the larger half of each row's weights, in place; return the masks."""
    keep = {}
    with torch.no_grad():
        for layer in layers:
            mask = Unstructured(per_row=True).mask(layer.weight.abs(), 0.5)
            layer.weight.masked_fill_(~mask, 0.0)
            keep[layer] = mask
    return keep


def _llama_block():
    """Block 0 of the own model as calibration runs it (packed weights), and a thunk per batch."""
    ours = LeanLlama.sharing(tiny_llama(layers=1), PackedWeights())
    block = ours.model.layers[0]
    hidden = [torch.randn(2, 16, 64) for _ in range(4)]
    cos, sin = ours.positions(0, 16, hidden[0])
    forwards = [partial(block, h, cos, sin) for h in hidden]
    return block, forwards


def _dense_targets(forwards):
    with torch.no_grad():
        return [forward() for forward in forwards]


def test_block_fit_lowers_the_loss_of_a_llama_block_and_trains_only_kept_weights():
    block, forwards = _llama_block()
    targets = _dense_targets(forwards)
    keep = _prune_half([m for m in block.modules() if isinstance(m, nn.Linear)])
    frozen = {name: p.detach().clone() for name, p in block.named_parameters() if not name.endswith("proj.weight")}
    trained = {layer: layer.weight.detach().clone() for layer in keep}
    flags = {name: p.requires_grad for name, p in block.named_parameters()}
    outputs = []
    fit = reconstruct_block(block, keep, forwards, targets, steps=8, lr=1e-3, outputs=outputs)
    assert isinstance(fit, BlockFit) and fit.steps == 8 and fit.seconds > 0
    assert fit.loss_after < 0.9 * fit.loss_before
    for output, again in zip(outputs, _dense_targets(forwards), strict=True):  # the fitted block's outputs
        assert torch.equal(output, again)
    for layer, mask in keep.items():
        pruned = layer.weight[~mask]
        assert torch.equal(pruned, torch.zeros_like(pruned)) and not pruned.signbit().any()
        assert not torch.equal(layer.weight, trained[layer])
    for name, p in block.named_parameters():
        assert p.requires_grad == flags[name]
        if name in frozen:
            assert torch.equal(p, frozen[name])


def test_block_fit_restores_the_start_when_the_loss_does_not_drop():
    block, forwards = _llama_block()
    targets = _dense_targets(forwards)
    keep = _prune_half([block.mlp.down_proj, block.self_attn.q_proj])
    start = {layer: layer.weight.detach().clone() for layer in keep}
    outputs = []
    fit = reconstruct_block(block, keep, forwards, targets, steps=4, lr=10.0, outputs=outputs)
    assert fit.loss_after == fit.loss_before
    for layer in keep:
        assert torch.equal(layer.weight, start[layer])
    again = _dense_targets(forwards)  # the packed weights of the linears saw the restore
    loss = sum(float((a - t).square().sum() / t.square().sum()) for a, t in zip(again, targets)) / len(targets)
    assert loss == pytest.approx(fit.loss_before, rel=1e-6)
    assert len(outputs) == len(again) and all(torch.equal(o, a) for o, a in zip(outputs, again))


def test_block_fit_of_a_plain_sequential_block():
    torch.manual_seed(5)
    block = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    inputs = [torch.randn(64, 16) for _ in range(3)]
    forwards = [partial(block, x) for x in inputs]
    targets = _dense_targets(forwards)
    bias = block[0].bias.detach().clone()
    keep = _prune_half([block[0], block[2]])
    fit = reconstruct_block(block, keep, forwards, targets, steps=30, lr=1e-2, precision="model")
    assert fit.loss_after < 0.7 * fit.loss_before
    assert torch.equal(block[0].bias, bias)
    assert all(torch.equal(layer.weight != 0, mask) for layer, mask in keep.items())


def test_block_fit_refuses_bad_arguments():
    block = nn.Sequential(nn.Linear(4, 4))
    forwards, targets = [partial(block, torch.randn(2, 4))], [torch.randn(2, 4)]
    with pytest.raises(ValueError, match="one target per calibration batch"):
        reconstruct_block(block, {}, forwards, [])
    with pytest.raises(ValueError, match="shaped like its weight"):
        reconstruct_block(block, {block[0]: torch.ones(4, 2, dtype=torch.bool)}, forwards, targets)
