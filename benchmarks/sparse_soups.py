"""Sparse model soups (Zimmer et al., 2024) on the tiny GPT: `sparse_training.py --soups`.

Per seed: prune with the benchmark's GMP run (cubic to 90%, uniform); retrain k copies of
the pruned model with its mask fixed, each with its own batch order (seed) and, where
several are given, its own peak learning rate, all for the same steps; average them
uniformly (`average`) and greedily (`greedy_soup`); and retrain one copy k times longer,
the soup's compute in one run. The greedy soup ranks and picks ingredients by their loss
on the selection split, the first half of the held-out plays' characters; every loss in
the table is on the test split, the second half. Runs are kept in
sparse_training_soups.json and their models in <out>/_work/sparse_training_soups/ until
the seed's soups are measured, so an interruption loses one run at most (--resume).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from results import machine
from sparsetorch.training import OneShot, Sparsifier, average, greedy_soup
from sparsetorch.training.demo import CharCorpus, GPTShape, RunResult, TrainConfig, gpt_loss, retrain_gpt, run_gpt
from sparsetorch.training.toys import TinyGPT

SOUPS_JSON = "sparse_training_soups.json"
PLAYS = (" (Hamlet and the start of Macbeth)", " (the rest of Macbeth, Othello)")  # the halves of the held-out plays


def split_held_out(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(selection, test): the first and the second half of the held-out text."""
    half = ids.numel() // 2
    return ids[:half], ids[half:]


def _result(raw: dict) -> RunResult:
    return RunResult(**{**raw, "curve": [tuple(point) for point in raw["curve"]]})


class Store:
    """The protocol's runs in a JSON file and the models it still needs in checkpoints."""

    def __init__(self, path: Path, settings: dict, resume: bool) -> None:
        self.path, self.settings = path, settings
        self.models = path.parent / "_work" / path.stem
        saved = json.loads(path.read_text()) if resume and path.exists() else None
        if saved is not None and saved["settings"] != settings:
            print(f"{path} holds runs with other settings; starting afresh", flush=True)
            saved = None
        self.runs = {} if saved is None else {key: _result(raw) for key, raw in saved["runs"].items()}
        self.soups: dict[str, dict] = {} if saved is None else saved["soups"]

    def _checkpoint(self, key: str) -> Path:
        return self.models / f"{key.replace('/', '-')}.pt"

    def has(self, key: str, model: bool) -> bool:
        return key in self.runs and (not model or self._checkpoint(key).exists())

    def add(self, key: str, result: RunResult, sparsifier: Sparsifier | None) -> None:
        """Record a run; with its sparsifier, also its model's weights and masks."""
        if sparsifier is not None:
            self.models.mkdir(parents=True, exist_ok=True)
            partial = self._checkpoint(key).with_suffix(".partial")
            torch.save({"state": sparsifier.model.state_dict(), "masks": sparsifier.masks()}, partial)
            partial.replace(self._checkpoint(key))
        self.runs[key] = result
        self._write()

    def checkpoint(self, key: str) -> dict:
        return torch.load(self._checkpoint(key))

    def finish(self, seed: int, record: dict, keys: list[str]) -> None:
        """Record a seed's soups and delete the checkpoints it needed."""
        self.soups[str(seed)] = record
        self._write()
        for key in keys:
            self._checkpoint(key).unlink(missing_ok=True)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        runs = {key: asdict(result) for key, result in self.runs.items()}
        self.path.write_text(json.dumps({"settings": self.settings, "runs": runs, "soups": self.soups}, indent=1))


class SoupProtocol:
    """Prune, retrain k times, soup; per seed, resumable.

    Args:
        args: the benchmark's arguments (seeds, eval_windows, soup_k, soup_steps, soup_lrs,
            out, resume).
        corpus: the encoded text; its held-out part is split into selection and test.
        shape: the model size.
        gmp_config: seed -> the benchmark's GMP run for that seed (the pruning step).
        settings: what must match for --resume to reuse runs.
    """

    def __init__(self, args: argparse.Namespace, corpus: CharCorpus, shape: GPTShape,
                 gmp_config: Callable[[int], TrainConfig], settings: dict) -> None:
        self.args, self.shape, self.gmp_config = args, shape, gmp_config
        self.selection, test = split_held_out(corpus.val)
        self.corpus = replace(corpus, val=test)  # every curve and final loss is on the test split
        self.store = Store(args.out / SOUPS_JSON, settings, args.resume)

    def run_all(self) -> dict[str, dict]:
        for seed in range(self.args.seeds):
            if str(seed) not in self.store.soups:
                self.seed(seed)
        return self.store.soups

    def seed(self, seed: int) -> None:
        k, steps = self.args.soup_k, self.args.soup_steps
        start = self.train(f"seed{seed}/gmp", lambda: run_gpt(self.gmp_config(seed), self.shape, self.corpus,
                                                               self.args.eval_windows), keep=True)
        ingredients = [self.train(f"seed{seed}/ingredient{i}", partial(self.retrain, start, seed, i, steps), keep=True)
                       for i in range(k)]
        self.train(f"seed{seed}/longer", partial(self.retrain, start, seed, k, k * steps), keep=False)
        models = [self.load(key) for key in ingredients]
        greedy = greedy_soup(models, self.selection_loss)
        record = {"uniform": self.losses(average(models)), "greedy": {**self.losses(greedy.model), "chosen": list(greedy.chosen)}}
        self.store.finish(seed, record, [start, *ingredients])
        print(f"seed {seed} uniform soup {record['uniform']['test']:.4f}  greedy soup {record['greedy']['test']:.4f} "
              f"(ingredients {greedy.chosen})", flush=True)

    def retrain(self, start: str, seed: int, index: int, steps: int) -> RunResult:
        """Ingredient `index` (or, with index k, the longer run): its own batch order, the
        learning rates cycled over the ingredients (the longer run takes the first)."""
        lrs = self.args.soup_lrs
        lr = lrs[index % len(lrs)] if index < self.args.soup_k else lrs[0]
        config = replace(self.gmp_config(seed), seed=100 * seed + index + 1, steps=steps, lr=lr)
        saved = self.store.checkpoint(start)
        return retrain_gpt(saved["state"], saved["masks"], config, self.shape, self.corpus, self.args.eval_windows)

    def train(self, key: str, fit: Callable[[], RunResult], keep: bool) -> str:
        """Run `fit` unless the store has the run (and, with `keep`, its model); returns `key`."""
        if not self.store.has(key, model=keep):
            result = fit()
            sparsifier = result.info.pop("stepper")
            result.label = key
            result.info.update(steps=result.curve[-1][0],
                               selection=gpt_loss(sparsifier.model, self.selection, self.args.eval_windows))
            self.store.add(key, result, sparsifier if keep else None)
        result = self.store.runs[key]
        print(f"{key:20s} test loss {result.final:.4f}  selection loss {result.info['selection']:.4f}  "
              f"{result.seconds:.0f} s", flush=True)
        return key

    def load(self, key: str) -> nn.Module:
        """A kept model, with its mask buffers, so soups compare exact masks."""
        saved = self.store.checkpoint(key)
        model = TinyGPT(len(self.corpus.vocab), self.shape.width, self.shape.layers, self.shape.heads, self.shape.context)
        Sparsifier(model, OneShot(), masks=saved["masks"])  # adds the mask buffers the state dict holds
        model.load_state_dict(saved["state"])
        return model

    def selection_loss(self, model: nn.Module) -> float:
        return gpt_loss(model, self.selection, self.args.eval_windows)

    def losses(self, model: nn.Module) -> dict[str, float]:
        return {"selection": self.selection_loss(model), "test": gpt_loss(model, self.corpus.val, self.args.eval_windows)}


# ---- the report --------------------------------------------------------------------------


def seed_row(protocol: SoupProtocol, seed: int) -> dict:
    """One seed's test losses, and whether the greedy soup beat every ingredient."""
    runs, soups = protocol.store.runs, protocol.store.soups[str(seed)]
    ingredients = [runs[f"seed{seed}/ingredient{i}"].final for i in range(protocol.args.soup_k)]
    greedy = soups["greedy"]["test"]
    return {"start": runs[f"seed{seed}/gmp"].final, "ingredients": ingredients, "best": min(ingredients),
            "uniform": soups["uniform"]["test"], "greedy": greedy, "chosen": soups["greedy"]["chosen"],
            "longer": runs[f"seed{seed}/longer"].final, "pass": greedy < min(ingredients)}


def soup_table(rows: list[dict], k: int) -> list[str]:
    lines = [f"| seed | pruned start (GMP) | {k} ingredients | best ingredient | uniform soup | greedy soup | greedy picks "
             f"(by selection loss) | {k}× longer retraining | greedy < every ingredient |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seed, row in enumerate(rows):
        ingredients = " / ".join(f"{value:.4f}" for value in row["ingredients"])
        lines.append(f"| {seed} | {row['start']:.4f} | {ingredients} | {row['best']:.4f} | {row['uniform']:.4f} | "
                     f"{row['greedy']:.4f} | {', '.join(map(str, row['chosen']))} | {row['longer']:.4f} | "
                     f"{'yes' if row['pass'] else 'no'} |")
    mean = {key: statistics.mean(row[key] for row in rows) for key in ("start", "best", "uniform", "greedy", "longer")}
    every = statistics.mean(value for row in rows for value in row["ingredients"])
    lines.append(f"| mean | {mean['start']:.4f} | {every:.4f} (all) | {mean['best']:.4f} | {mean['uniform']:.4f} | "
                 f"{mean['greedy']:.4f} | – | {mean['longer']:.4f} | {sum(row['pass'] for row in rows)} of {len(rows)} |")
    return lines


def soup_verdicts(rows: list[dict]) -> list[str]:
    margins = ", ".join(f"{row['best'] - row['greedy']:+.4f}" for row in rows)
    uniform = sum(row["uniform"] < row["best"] for row in rows)
    return [f"- greedy soup's test loss below every ingredient's on every seed (best ingredient - greedy: {margins}): "
            f"{'PASS' if all(row['pass'] for row in rows) else 'FAIL'}",
            f"- uniform soup below every ingredient on {uniform} of {len(rows)} seeds"]


def soup_section(protocol: SoupProtocol, soups: dict[str, dict], command: str) -> list[str]:
    """Prints the table and verdicts; returns the RESULTS.md section."""
    args, k = protocol.args, protocol.args.soup_k
    shakespeare = protocol.corpus.source == "shakespeare"
    rows = [seed_row(protocol, seed) for seed in range(args.seeds)]
    table, verdicts = soup_table(rows, k), soup_verdicts(rows)
    print("\n".join([*table, "", *verdicts]))
    runs = protocol.store.runs
    minutes = sum(r.seconds for r in runs.values()) / 60
    ingredient, longer, start = (runs[f"seed0/{name}"].flops for name in ("ingredient0", "longer", "gmp"))
    compute = (f"Compute (training FLOPs, as in the main table): pruning run {start[-1]:.3g}; each retraining "
               f"{ingredient[-1]:.3g}, the soup {k} × that = {k * ingredient[-1]:.3g}; the longer run {longer[-1]:.3g}."
               if ingredient and longer and start else "")
    return [
        f"## Sparse model soups: tiny GPT on Shakespeare ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command}`  ",
        f"Python {platform.python_version()}, {machine()}; {minutes:.0f} min of training in all.  ",
        f"Protocol (Zimmer et al., 2024): per seed, the main benchmark's GMP run prunes to 90% ({args.steps} steps); "
        f"{k} retrainings of that pruned model, mask fixed, {args.soup_steps} steps each (AdamW, warm-up and cosine "
        f"restarted, peak lr {' / '.join(map(str, args.soup_lrs))} cycled over the ingredients), each with its own batch "
        f"order; the uniform soup averages all {k}; the greedy soup ranks them by selection loss and adds each next one "
        f"if the average's selection loss drops; the longer run retrains the pruned model once for {k * args.soup_steps} "
        f"steps (the soup's compute). Selection split: the first half of the held-out text{PLAYS[0] if shakespeare else ''}; "
        f"test split: the second half{PLAYS[1] if shakespeare else ''}; {args.eval_windows} windows of {args.context} "
        "characters each. All losses below are test losses.",
        "",
        *table,
        "",
        *verdicts,
        "",
        *([compute, ""] if compute else []),
        f"Raw numbers (curves, selection losses): `{SOUPS_JSON}`.",
        "",
    ]
