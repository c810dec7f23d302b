import pytest
import torch

from sparsetorch.cli import main
from sparsetorch.training.demo import (
    CharCorpus,
    GPTShape,
    TrainConfig,
    digits_data,
    gpt_loss,
    lr_at,
    retrain_gpt,
    run_digits,
    run_gpt,
)


def test_digits_split_is_fixed_and_disjoint():
    x_train, y_train, _, y_test = digits_data()
    assert (len(y_train), len(y_test)) == (1437, 360)
    assert torch.equal(digits_data()[3], y_test)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    rates = [lr_at(step, 100, 1.0) for step in range(100)]
    assert rates[0] == pytest.approx(0.2) and rates[4] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("method", ["rigl", "srste"])
def test_a_short_digits_run_is_sparse_and_learns(method):
    result = run_digits(TrainConfig(method=method, steps=30, sparsity=0.8, eval_every=10))
    assert result.sparsity == pytest.approx(0.8 if method == "rigl" else 0.5, abs=0.01)
    assert [step for step, _ in result.curve] == [0, 10, 20, 30]
    assert result.curve[-1][1] < result.curve[0][1]


TINY = GPTShape(width=32, layers=1, heads=2, context=16)


def tiny_corpus() -> CharCorpus:
    text = "to be or not to be, that is the question. " * 40
    vocab = "".join(sorted(set(text)))
    ids = torch.tensor([vocab.index(c) for c in text])
    return CharCorpus(vocab, ids[:1200], ids[1200:], "test")


def test_a_tiny_gpt_run_on_given_text():
    result = run_gpt(TrainConfig(method="gmp", steps=12, sparsity=0.5, batch_size=4, lr=3e-3, eval_every=6),
                     TINY, tiny_corpus(), eval_windows=4)
    assert result.sparsity == pytest.approx(0.5)
    assert result.curve[-1][1] < result.curve[0][1]


def test_retraining_keeps_the_pruned_masks_and_counts_sparse_flops():
    corpus = tiny_corpus()
    config = TrainConfig(method="gmp", steps=12, sparsity=0.5, batch_size=4, lr=3e-3, eval_every=6)
    pruned = run_gpt(config, TINY, corpus, eval_windows=4).info["stepper"]
    masks = pruned.masks()
    result = retrain_gpt(pruned.model.state_dict(), masks, TrainConfig(method="gmp", steps=5, seed=1, batch_size=4,
                                                                       lr=1e-3, eval_every=5), TINY, corpus, eval_windows=4)
    retrained = result.info["stepper"]
    assert result.label == "retrain" and result.sparsity == pytest.approx(0.5)
    assert all(torch.equal(mask, masks[name]) for name, mask in retrained.masks().items())
    assert result.curve[0][1] == pytest.approx(gpt_loss(pruned.model, corpus.val, 4))  # starts where pruning ended
    assert result.final == gpt_loss(retrained.model, corpus.val, 4)
    rows = 4 * TINY.context  # tokens per step through every Linear
    layers = dict(retrained.model.named_modules())
    per_step = sum(6 * int(masks[name].sum()) * rows for name in masks) + 6 * layers["lm_head"].weight.numel() * rows
    assert result.flops == [0, 5 * per_step]


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        TrainConfig(sparsity=1.0)


def test_cli_train_demo(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert main(["train-demo", "--task", "digits", "--model", "mlp", "--methods", "dense", "static", "--steps", "12",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| dense | 0.0% |" in out and "| static | 90.0% |" in out
    assert plot.stat().st_size > 1000


def test_cli_train_demo_bad_method_is_one_line(capsys):
    assert main(["train-demo", "--methods", "magic"]) == 2
    assert "sparsetorch train-demo: error: unknown sparse-training method 'magic'" in capsys.readouterr().err
