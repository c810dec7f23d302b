import pytest
import torch

from sparsetorch.cli import main
from sparsetorch.training.demo import CharCorpus, GPTShape, TrainConfig, digits_data, lr_at, run_digits, run_gpt


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


def test_a_tiny_gpt_run_on_given_text():
    text = "to be or not to be, that is the question. " * 40
    vocab = "".join(sorted(set(text)))
    ids = torch.tensor([vocab.index(c) for c in text])
    corpus = CharCorpus(vocab, ids[:1200], ids[1200:], "test")
    result = run_gpt(TrainConfig(method="gmp", steps=12, sparsity=0.5, batch_size=4, lr=3e-3, eval_every=6),
                     GPTShape(width=32, layers=1, heads=2, context=16), corpus, eval_windows=4)
    assert result.sparsity == pytest.approx(0.5)
    assert result.curve[-1][1] < result.curve[0][1]


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="steps must be a positive whole number"):
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
