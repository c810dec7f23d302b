"""Quality of one-shot pruning on the bundled SmolLM2-135M: each step stacked, against llm-compressor.

    python benchmarks/quality_llm.py                                   # the full table: 50%, 2:4, 70%
    python benchmarks/quality_llm.py --patterns 0.7 --methods sparsegpt --resume
    python benchmarks/quality_llm.py --resume --steps --recover sparsegpt+block@0.5 --recover-steps 200

For every sparsity, our runs stack one step at a time on each method (method → + allocation →
+ DSnoT refinement → + layer reconstruction → + block reconstruction), `--recover STACK@PATTERN`
adds recovery by distillation from the dense model after a stack (`--recover-steps` steps of
`--recover-batch` windows drawn from the calibration plays; its seconds are pruning + recovery,
the issue's 30-minute budget), and llm-compressor prunes the
same calibration windows with its Wanda and SparseGPT in its own environment (`llmcompressor_worker.py`).
Perplexity is measured by the same code for every row on two held-out texts: the held-out plays
(Hamlet, Macbeth, Othello) and CPython's language reference (`pydoc_data.topics`, technical English
prose that neither calibration nor any default touches), so a gain cannot be one text's.

Every finished row is kept in benchmarks/_work/quality_rows.jsonl; `--resume` reuses the rows of the
same protocol, so a long run interrupted midway loses one row at most. Writes a table and a plot
(perplexity against sparsity, one line per stack) and appends them to RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oneshot_llm import WORK, prepare_data, reference_python
from results import header, publish

HERE = Path(__file__).parent
ROWS = WORK / "quality_rows.jsonl"
STEPS = ("method", "allocation", "refine", "layer", "block")  # what each stack adds, in order


@dataclass
class Row:
    tool: str
    method: str
    pattern: str  # '50%', '2:4', '70%'
    stack: str  # e.g. 'sparsegpt + owl + dsnot'
    seconds: float
    perplexity: dict[str, float]
    protocol: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.tool, self.method, self.pattern, self.stack


def _label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern):.0%}"


def _stacks(method: str, pattern: str, allocation: str) -> list[tuple[str, str, dict]]:
    """(last step, name, prune options) for each prefix of STEPS; allocation is skipped where N:M fixes it."""
    stacks, spec = [], method
    for step in STEPS:
        if step == "allocation":
            if ":" in pattern or allocation == "uniform":
                continue
            spec += f"+{allocation}"
        elif step == "refine":
            spec += "+dsnot"
        elif step in ("layer", "block"):
            spec = spec.removesuffix("+layer") + f"+{step}"  # block reconstruction includes the layer refit
        stacks.append((step, *_extra(spec, pattern)))
    return stacks


def _extra(spec: str, pattern: str) -> tuple[str, dict] | None:
    """A stack named on the command line, e.g. 'wanda+block' or 'sparsegpt+owl+layer': (name, prune options);
    None where it does not apply to `pattern` (an allocation under N:M)."""
    method, *steps = spec.split("+")
    options: dict = {"method": method}
    options.update({"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)})
    names = {"dsnot": "dsnot", "layer": "layer refit", "block": "block refit"}
    for step in steps:
        if step in ("owl", "depth"):
            if ":" in pattern:
                return None
            options["allocation"] = step
        elif step == "dsnot":
            options["refine"] = "dsnot"
        elif step in ("layer", "block"):
            options["reconstruct"] = step
        else:
            raise SystemExit(f"--extra {spec}: unknown step {step!r} (owl, depth, dsnot, layer, block)")
    return " + ".join([method, *(names.get(step, step) for step in steps)]), options


def _texts(tokenizer, split, tokens: int, seqlen: int) -> dict[str, torch.Tensor]:
    from pydoc_data.topics import topics

    from sparsetorch.data import evaluation_windows

    reference = "\n".join(topics[key] for key in sorted(topics))
    return {"held-out plays": evaluation_windows(tokenizer, split.evaluation, tokens, seqlen),
            "Python reference": evaluation_windows(tokenizer, reference, tokens, seqlen)}


def _load_rows(protocol: str) -> dict[tuple, Row]:
    if not ROWS.exists():
        return {}
    rows = [Row(**json.loads(line)) for line in ROWS.read_text().splitlines() if line.strip()]
    return {row.key: row for row in rows if row.protocol == protocol}


def _keep(row: Row) -> None:
    with open(ROWS, "a") as f:
        f.write(json.dumps(asdict(row)) + "\n")
    print(f"{row.tool:14s} {row.pattern:4s} {row.stack:45s} {row.seconds:6.1f} s "
          + "  ".join(f"{k} {v:.2f}" for k, v in row.perplexity.items()), flush=True)


def _theirs(method: str, pattern: str, calibration: Path, ref_python: Path, model_dir: Path) -> tuple[Path, float]:
    """Prune with llm-compressor in its environment; (its pruned Linear weights, seconds of its oneshot call)."""
    structure, sparsity = (pattern, 0.5) if ":" in pattern else ("0:0", float(pattern))
    out = WORK / f"quality-llmc-{method}-{pattern.replace(':', 'of')}.safetensors"
    log = WORK / f"quality-llmc-{method}-{pattern.replace(':', 'of')}.log"
    command = [str(ref_python), str(HERE / "llmcompressor_worker.py"), "--model", str(model_dir), "--calibration",
               str(calibration), "--method", method, "--structure", structure, "--sparsity", str(sparsity),
               "--out", str(out)]
    with open(log, "w") as f:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llm-compressor failed; see {log}")
    return out, json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=["0.5", "2:4", "0.7"],
                        help="sparsities (unstructured) or N:M patterns (default: 0.5 2:4 0.7)")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS,
                        help="which stacks to run (each includes the steps before it; none: only llm-compressor)")
    parser.add_argument("--allocation", default="owl", help="the allocation step's rule (default: owl)")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="further stacks to run at every pattern, e.g. wanda+block sparsegpt+owl+layer; "
                             "STACK@PATTERN runs one at that pattern only (wanda+block@0.5)")
    parser.add_argument("--recover", nargs="*", default=[],
                        help="stacks to recover by distillation after pruning, STACK@PATTERN (sparsegpt+block@0.5)")
    parser.add_argument("--recover-steps", type=int, default=200, help="recovery steps (default: 200)")
    parser.add_argument("--recover-batch", type=int, default=2, help="windows per recovery step (default: 2)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation text (default: 16384)")
    parser.add_argument("--reference-python", help="llm-compressor environment's python (default: created in _work)")
    parser.add_argument("--no-reference", action="store_true", help="skip llm-compressor")
    parser.add_argument("--resume", action="store_true", help="reuse finished rows of the same protocol")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append to RESULTS.md")
    args = parser.parse_args()

    from safetensors.torch import load_file

    import sparsetorch
    from sparsetorch.data import calibration_windows
    from sparsetorch.evaluate.perplexity import perplexity
    from sparsetorch.models import load_model

    started = time.time()
    protocol = f"samples={args.samples} seqlen={args.seqlen} eval={args.eval_tokens}"
    done = _load_rows(protocol) if args.resume else {}
    if not args.resume and ROWS.exists():
        ROWS.unlink()
    model_dir, split, calibration, _ = prepare_data(args.samples, args.seqlen, args.eval_tokens, "quality-calib.pt")
    ref_python = None if args.no_reference else reference_python(args.reference_python)
    model, tokenizer, _ = load_model(None, progress=False)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = copy.deepcopy(model).eval() if args.recover else None
    recovery_windows = calibration_windows(tokenizer, split.calibration, args.recover_steps * args.recover_batch,
                                           args.seqlen, seed=1)  # seed 0 drew the pruning windows
    windows = torch.load(calibration)
    texts = _texts(tokenizer, split, args.eval_tokens, args.seqlen)

    def measure() -> dict[str, float]:
        return {name: perplexity(model, ids, progress=False) for name, ids in texts.items()}

    def run(tool: str, method: str, pattern: str, stack: str, prune) -> Row:
        key = (tool, method, _label(pattern), stack)
        if key in done:
            return done[key]
        model.load_state_dict(dense_state)
        seconds = prune()
        row = Row(tool, method, _label(pattern), stack, seconds, measure(), protocol)
        _keep(row)
        return row

    rows = [run("–", "dense", "0", "dense", lambda: 0.0)]
    for pattern in args.patterns:
        for method in args.methods:
            if ref_python is not None:
                def theirs(method=method, pattern=pattern) -> float:
                    weights, seconds = _theirs(method, pattern, calibration, ref_python, model_dir)
                    model.load_state_dict(load_file(weights), strict=False)
                    return seconds
                rows.append(run("llm-compressor", method, pattern, method, theirs))
            for step, stack, options in _stacks(method, pattern, args.allocation):
                if step not in args.steps:
                    continue

                def ours(options=options) -> float:
                    return sparsetorch.prune(model, windows, progress=False, **options).seconds
                rows.append(run("sparsetorch", method, pattern, stack, ours))
        for spec in args.extra:
            spec, _, only = spec.partition("@")
            if only and only != pattern:
                continue
            extra = _extra(spec, pattern)
            if extra is not None:
                rows.append(run("sparsetorch", spec.split("+")[0], pattern, extra[0],
                                lambda options=extra[1]: sparsetorch.prune(model, windows, progress=False,
                                                                           **options).seconds))
        for spec in args.recover:
            spec, _, only = spec.partition("@")
            extra = _extra(spec, pattern) if only in ("", pattern) else None
            if extra is None:
                continue
            stack = f"{extra[0]} + recover {args.recover_steps} × {args.recover_batch}"

            def recovered(options=extra[1]) -> float:
                seconds = sparsetorch.prune(model, windows, progress=False, **options).seconds
                report = sparsetorch.recover(model, teacher, recovery_windows, steps=args.recover_steps,
                                             batch_size=args.recover_batch)
                print(f"  recovery: {report.seconds:.0f} s, {report.tokens_per_second:.0f} tokens/s, "
                      f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}", flush=True)
                return seconds + report.seconds
            rows.append(run("sparsetorch", spec.split("+")[0], pattern, stack, recovered))
    minutes = (time.time() - started) / 60
    plot = HERE / "quality_llm.png"
    _plot(rows, plot)
    publish([*header("Quality of one-shot pruning, each step stacked, SmolLM2-135M-Instruct", "quality_llm.py"),
             f"Data: {args.samples} calibration windows × {args.seqlen} tokens from the calibration plays (the same "
             f"windows for both tools); perplexity on {args.eval_tokens} tokens of each text, windows of "
             f"{args.seqlen}; 'dense' layer inputs; seconds are the pruning call only (llm-compressor: its "
             f"`oneshot` call), for '+ recover' rows pruning + recovery ({args.recover_batch} windows of "
             f"{args.seqlen} tokens per step, drawn from the calibration plays with another seed); "
             f"total {minutes:.0f} min. Plot: `benchmarks/{plot.name}`.", "",
             *_table(rows), ""], append=not args.no_append)


def _table(rows: list[Row]) -> list[str]:
    dense = rows[0].perplexity
    names = list(dense)
    reference = {row.pattern: row for row in rows if row.tool == "llm-compressor" and row.method == "sparsegpt"}
    lines = ["| tool | sparsity | stack | " + " | ".join(f"{n} ppl (× dense)" for n in names)
             + " | vs llm-compressor SparseGPT, per text | prune s | time vs its SparseGPT |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|",
             "| – | 0% | dense | " + " | ".join(f"{dense[n]:.2f}" for n in names) + " | – | – | – |"]
    for row in rows[1:]:
        cells = " | ".join(f"{row.perplexity[n]:.2f} ({row.perplexity[n] / dense[n]:.2f}×)" for n in names)
        ref = reference.get(row.pattern)
        vs = "–" if ref is None else " / ".join(f"{row.perplexity[n] / ref.perplexity[n]:.2f}×" for n in names)
        time_vs = "–" if ref is None else f"{row.seconds / ref.seconds:.2f}×"
        lines.append(f"| {row.tool} | {row.pattern} | {row.stack} | {cells} | {vs} | {row.seconds:.1f} | {time_vs} |")
    return lines


def _plot(rows: list[Row], path: Path) -> None:
    """Perplexity (log) against sparsity, one line per stack and tool; 2:4 as its own marker at 50%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = rows[0].perplexity
    fig, axes = plt.subplots(1, len(dense), figsize=(7 * len(dense), 5))
    for ax, text in zip(axes, dense):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 stacks, each its own colour
        lines: dict[str, list[Row]] = {}
        for row in rows[1:]:
            lines.setdefault(f"{row.tool}: {row.stack}", []).append(row)
        for label, members in lines.items():
            unstructured = sorted((r for r in members if "%" in r.pattern), key=lambda r: r.pattern)
            style = "--" if label.startswith("llm-compressor") else "-"
            drawn = ax.plot([float(r.pattern[:-1]) / 100 for r in unstructured],
                            [r.perplexity[text] for r in unstructured], style, marker="o", label=label)
            for r in members:
                if ":" in r.pattern:
                    ax.plot([0.5], [r.perplexity[text]], marker="s", color=drawn[0].get_color(), linestyle="none")
        ax.axhline(dense[text], color="black", linewidth=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (circles unstructured, squares 2:4)")
        ax.set_ylabel("perplexity")
        ax.set_title(text)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
