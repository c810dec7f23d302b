"""Recovery by sparse distillation: fixed masks, the losses, resume, and `sparsetorch recover`."""

import copy
import importlib
import json

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from sparsetorch.cli import main
from sparsetorch.formats.pruned import load_pruned, save_pruned
from sparsetorch.training import OneShot, Sparsifier
from sparsetorch.training.distill import feature_loss, kl_to_teacher, normalized_mse
from sparsetorch.training.recover import RecoverConfig, StaleRecoveryError, recover, warmup_cosine

recover_module = importlib.import_module("sparsetorch.training.recover")  # the package's `recover` is the function
VOCAB = 128


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls run fastest on one thread, and these tests share two cores with others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def magnitude_prune(model: nn.Module, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    """Zero the smallest |w| of every Linear but lm_head, in place; return {layer: keep-mask}."""
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                weight = module.weight
                keep = torch.ones(weight.numel(), dtype=torch.bool)
                keep[weight.abs().flatten().argsort()[: int(sparsity * weight.numel())]] = False
                masks[name] = keep.view_as(weight)
                weight.masked_fill_(~masks[name], 0.0)
    return masks


def pair(seed: int = 0, sparsity: float = 0.5, **kwargs):
    torch.manual_seed(seed)
    teacher = tiny_llama(vocab=VOCAB, **kwargs)
    student = copy.deepcopy(teacher)
    return student, teacher, magnitude_prune(student, sparsity)


def windows(count: int = 10, tokens: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, tokens), generator=torch.Generator().manual_seed(1))


FAST = {"lr": 1e-2, "batch_size": 2, "warmup": 1, "autocast": "off", "progress": False}


# ---- the pieces ----------------------------------------------------------------------


def test_losses_by_hand():
    assert normalized_mse(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])).item() == 0.5
    ones = torch.ones(2, 3, 4)
    assert feature_loss([ones, 2 * ones], [ones, ones]).item() == 0.5  # blocks 0 and 1: mean of 0 and 1
    logits = torch.randn(2, 5, 7)
    assert kl_to_teacher(logits, logits + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # a shift is no difference
    certain = torch.tensor([[0.0, 100.0]])  # the teacher is sure of token 1; the student is torn between two
    assert kl_to_teacher(torch.zeros(1, 2), certain).item() == pytest.approx(0.693147, abs=1e-6)  # log 2


def test_warmup_then_cosine():
    assert [round(warmup_cosine(s, 6, 2), 2) for s in range(6)] == [0.5, 1.0, 1.0, 0.85, 0.5, 0.15]
    assert warmup_cosine(0, 10, 0) == 1.0


@pytest.mark.parametrize("changes,message", [
    ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
    ({"lr": -1.0}, r"lr must be a finite number > 0.0, got -1.0"),
    ({"autocast": "fp16"}, r"autocast must be one of \['auto', 'bf16', 'off'\], got 'fp16'"),
    ({"kl_weight": 0, "feature_weight": 0}, "give at least one loss a weight > 0"),
])
def test_config_names_the_bad_value(changes, message):
    with pytest.raises(ValueError, match=message):
        RecoverConfig(**{"steps": 1, **changes})


def test_sparsifier_starts_from_given_masks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    given = {"0": torch.rand(4, 4) > 0.3, "2": torch.ones(2, 4, dtype=torch.bool)}
    given["2"][0, 0] = False
    sparsifier = Sparsifier(model, OneShot(), masks=given)
    assert all(torch.equal(sparsifier.masks()[name], mask) for name, mask in given.items())
    assert (model[0].weight[~given["0"]] == 0).all() and model[2].weight[0, 0] == 0
    assert sparsifier.scheduled_sparsity() == pytest.approx({"0": 1 - given["0"].float().mean().item(), "2": 1 / 8})
    with pytest.raises(ValueError, match=r"masks has no entry for target layers \['2'\]"):
        Sparsifier(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), OneShot(), masks={"0": given["0"]})
    with pytest.raises(ValueError, match=r"masks\['0'\] has shape \(2, 4\), but the layer's weight is \(4, 4\)"):
        Sparsifier(nn.Sequential(nn.Linear(4, 4)), OneShot(), masks={"0": given["2"]})
    with pytest.raises(TypeError, match=r"masks\['0'\] must be a boolean tensor"):
        Sparsifier(nn.Sequential(nn.Linear(4, 4)), OneShot(), masks={"0": torch.ones(4, 4)})


# ---- recover ---------------------------------------------------------------------------


def test_pruned_weights_and_their_adam_moments_stay_exactly_zero(tmp_path):
    student, teacher, masks = pair()
    before = copy.deepcopy(student.state_dict())
    report = recover(student, teacher, windows(), steps=6, weight_decay=0.1, checkpoint=tmp_path / "ckpt",
                     checkpoint_every=3, **FAST)
    assert report.steps == 6 and len(report.losses) == 6 and report.tokens == 6 * 2 * 16
    modules = dict(student.named_modules())
    for name, keep in masks.items():
        weight = modules[name].weight
        assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum())))
        assert not torch.equal(weight[keep], before[f"{name}.weight"][keep])  # the kept weights trained
    assert not any(name.endswith("weight_mask") for name, _ in student.named_buffers())  # finalized

    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)["optimizer"]["state"]
    index = {id(p): i for i, p in enumerate(p for p in student.parameters() if p.requires_grad)}
    for name, keep in masks.items():
        moments = state[index[id(modules[name].weight)]]
        assert (moments["exp_avg"][~keep] == 0).all() and (moments["exp_avg_sq"][~keep] == 0).all()
        assert (moments["exp_avg_sq"][keep] > 0).any()


def test_loss_decreases_and_the_teacher_is_left_alone():
    student, teacher, _ = pair(sparsity=0.6)
    dense = copy.deepcopy(teacher.state_dict())
    report = recover(student, teacher, windows(16, 32), steps=30, lr=1e-3, batch_size=4, warmup=2, autocast="off",
                     progress=False)
    first, last = sum(report.losses[:5]) / 5, sum(report.losses[-5:]) / 5
    assert last < 0.6 * first, report.losses
    assert set(report.parts) == {"kl", "feature"} and report.tokens_per_second > 0
    assert all(torch.equal(value, dense[key]) for key, value in teacher.state_dict().items())
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())


def _with_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.2  # so the run draws random numbers a resume must restore
    return model


def test_resume_gives_the_bit_identical_result(tmp_path, monkeypatch):
    student, teacher, _ = pair()
    options = {"steps": 6, "accumulation": 2, "seed": 3, **FAST, "batch_size": 3}  # batches straddle epochs
    data = windows(7)
    whole = _with_dropout(copy.deepcopy(student))
    uninterrupted = recover(whole, teacher, data, **options)

    save = recover_module._Trainer.save

    def save_then_interrupt(self, directory, step, fingerprint):
        save(self, directory, step, fingerprint)
        if step == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(recover_module._Trainer, "save", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            recover(_with_dropout(copy.deepcopy(student)), teacher, data, checkpoint=tmp_path, checkpoint_every=2,
                    **options)
    resumed_model = _with_dropout(copy.deepcopy(student))
    resumed = recover(resumed_model, teacher, data, checkpoint=tmp_path, checkpoint_every=2, **options)
    assert resumed.resumed_from == 4 and resumed.losses == uninterrupted.losses
    expected = whole.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in resumed_model.state_dict().items())

    with pytest.raises(StaleRecoveryError, match="written by a run with other config"):
        recover(copy.deepcopy(student), teacher, data, checkpoint=tmp_path, **{**options, "lr": 5e-3})


def test_a_teacher_of_another_shape_or_architecture_is_refused():
    student, _, _ = pair()
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight is \(128, 64\) in the student and "
                                         r"\(256, 64\) in the teacher"):
        recover(student, tiny_llama(vocab=VOCAB, intermediate=256), windows(), steps=1, progress=False)
    other = tiny_llama(vocab=VOCAB)
    other.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="configs differ in hidden_act: 'silu' vs 'gelu'"):
        recover(student, other, windows(), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"token ids outside \[0, 128\)"):
        recover(student, copy.deepcopy(student), windows() + VOCAB, steps=1, progress=False)


# ---- the command line ------------------------------------------------------------------


@pytest.fixture
def pruned_dir(tiny_model_dir, tmp_path):
    """The tiny model pruned to 50% by magnitude, saved as `sparsetorch prune` saves it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    masks = magnitude_prune(model)
    layers = {name: {"shape": list(mask.shape), "target_sparsity": 0.5, "sparsity": 0.5, "seconds": 0.0}
              for name, mask in masks.items()}
    report = {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, "config": {"ignore": ["lm_head"]},
              "seconds": 0.0, "layers": layers}
    out = tmp_path / "pruned"
    save_pruned(model, out, report, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), source=str(tiny_model_dir))
    return out


def _recover_args(pruned, out, text_files, *extra):
    return ["recover", str(pruned), "--out", str(out), "--text", str(text_files[0]), "--eval-text", str(text_files[1]),
            "--eval-tokens", "256", "--seqlen", "32", "--steps", "4", "--batch-size", "2", "--lr", "1e-3",
            "--autocast", "off", "--quiet", *extra]


def test_recover_command_end_to_end(pruned_dir, text_files, tmp_path, capsys):
    out = tmp_path / "recovered"
    assert main(_recover_args(pruned_dir, out, text_files, "--checkpoint-every", "2")) == 0
    printed = capsys.readouterr().out
    assert "dense teacher" in printed and "before recovery" in printed and "after recovery" in printed
    assert not (tmp_path / "recovered.resume").exists()  # the checkpoint goes once the output is safe
    record = json.loads((out / "sparsity.json").read_text())
    recovery = record["recovery"]
    assert recovery["steps"] == 4 and recovery["teacher"] == record["source_model"]  # the teacher it recorded
    assert set(recovery["perplexity"]) >= {"teacher", "before", "after"} and recovery["config"]["lr"] == 1e-3
    assert record["layers"].keys() == json.loads((pruned_dir / "sparsity.json").read_text())["layers"].keys()

    before, after, compressed = load_pruned(pruned_dir), load_pruned(out), load_pruned(out, compressed=True)
    for name, module in before.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            pruned = module.weight == 0
            assert (after.get_submodule(name).weight[pruned] == 0).all()
    assert all(torch.equal(value, compressed.state_dict()[key]) for key, value in after.state_dict().items())

    assert main(_recover_args(pruned_dir, out, text_files)) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_recover_command_refuses_what_it_cannot_do(pruned_dir, tiny_model_dir, text_files, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = tmp_path / "other-teacher"
    tiny_llama(vocab=len(tokenizer), tie=True, intermediate=256).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(_recover_args(pruned_dir, tmp_path / "o", text_files, "--teacher", str(other))) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetorch recover: error: ") and len(err.strip().splitlines()) == 1
    assert f"{other} cannot teach {pruned_dir}: student and teacher do not match: model.layers.0.mlp." in err

    (tmp_path / "o.resume").mkdir()
    assert main(_recover_args(pruned_dir, tmp_path / "o", text_files)) == 2
    assert "o.resume holds an interrupted recovery run; pass --resume to continue it" in capsys.readouterr().err

    record = json.loads((pruned_dir / "sparsity.json").read_text())
    (pruned_dir / "sparsity.json").write_text(json.dumps({**record, "source_model": None}))
    assert main(_recover_args(pruned_dir, tmp_path / "o", text_files)) == 2
    assert "records no source model; pass the dense model with --teacher" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
