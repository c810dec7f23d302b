"""Quality of joint pruning + quantization on the bundled SmolLM2-135M (issue 15).

    python benchmarks/quality_quant.py                  # every row, appended to RESULTS.md
    python benchmarks/quality_quant.py --resume         # reuse the finished rows of the same protocol
    python benchmarks/quality_quant.py --smoke          # a tiny random Llama, a few tokens: checks the script

Rows: the dense model; dense + int8 and + int4-g128 round to nearest (RTN), and + int4-g128 by
GPTQ (SparseGPT's joint sweep at 0% sparsity); SparseGPT at 50% in fp32, + int8 and + int4-g128
quantized jointly in its sweep (GPTQ-style), + int4-g128 RTN after it (the comparison the joint
mode must win), + int4-g32 and + int4-g128 with zero points (joint); dense + int4-g32 RTN (llama.cpp
Q4_0's group); SparseGPT 2:4 in fp32 and + int4-g128 joint. Every quantized row also rounds
the embeddings to int8 per row (`PruneConfig.quantize_embeddings`), as a saved model would be.
Perplexity is measured by the same code on both held-out texts of `quality_llm.py` (the held-out
plays and CPython's language reference), so a gain cannot be one text's; seconds are the pruning
call only (RTN after SparseGPT: both). Finished rows are kept in
benchmarks/_work/quality_quant_rows.jsonl for `--resume`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from oneshot_llm import WORK, prepare_data
from quality_llm import _texts
from results import header, publish

ROWS = WORK / "quality_quant_rows.jsonl"
SMOKE = dict(samples=4, seqlen=32, eval_tokens=256)


@dataclass(frozen=True)
class Setting:
    """One row: a short key (for --rows), a label and the `sparsetorch.prune` options (None: the dense
    model); `rtn_after` rounds the pruned model to nearest afterwards, with this scheme name."""

    key: str
    label: str
    options: dict | None
    rtn_after: str | None = None
    base: str | None = None  # the key of the unquantized row this one is compared with


SETTINGS = [
    Setting("dense", "dense", None),
    Setting("dense-int8", "dense + int8 RTN", dict(method="magnitude", sparsity=0.0, quantize="int8"), base="dense"),
    Setting("dense-int4", "dense + int4-g128 RTN",
            dict(method="magnitude", sparsity=0.0, quantize="int4", clip_search=False),
            base="dense"),
    Setting("dense-int4-gptq", "dense + int4-g128 GPTQ",
            dict(method="sparsegpt", sparsity=0.0, quantize="int4", clip_search=False),
            base="dense"),
    Setting("dense-int4-g32", "dense + int4-g32 RTN",
            dict(method="magnitude", sparsity=0.0, quantize="int4-g32", clip_search=False),
            base="dense"),
    Setting("sgpt50", "sparsegpt 50%", dict(method="sparsegpt", sparsity=0.5)),
    Setting("sgpt50-int8", "sparsegpt 50% + int8 joint", dict(method="sparsegpt", sparsity=0.5, quantize="int8"),
            base="sgpt50"),
    Setting("sgpt50-int4", "sparsegpt 50% + int4-g128 joint",
            dict(method="sparsegpt", sparsity=0.5, quantize="int4", clip_search=False),
            base="sgpt50"),
    Setting("sgpt50-int4-rtn", "sparsegpt 50% + int4-g128 RTN", dict(method="sparsegpt", sparsity=0.5), rtn_after="int4",
            base="sgpt50"),
    Setting("sgpt50-int4-g32", "sparsegpt 50% + int4-g32 joint",
            dict(method="sparsegpt", sparsity=0.5, quantize="int4-g32", clip_search=False), base="sgpt50"),
    Setting("sgpt50-int4-asym", "sparsegpt 50% + int4-g128-asym joint",
            dict(method="sparsegpt", sparsity=0.5, quantize="int4-g128-asym", clip_search=False), base="sgpt50"),
    Setting("sgpt24", "sparsegpt 2:4", dict(method="sparsegpt", pattern="2:4")),
    Setting("sgpt24-int4", "sparsegpt 2:4 + int4-g128 joint",
            dict(method="sparsegpt", pattern="2:4", quantize="int4", clip_search=False),
            base="sgpt24"),
    # searched clipping (`PruneConfig.clip_search`) against the same rows with each group's full range
    Setting("dense-int4-search", "dense + int4-g128 RTN, searched", dict(method="magnitude", sparsity=0.0,
            quantize="int4", clip_search=True), base="dense"),
    Setting("dense-int4-gptq-search", "dense + int4-g128 GPTQ, searched", dict(method="sparsegpt", sparsity=0.0,
            quantize="int4", clip_search=True), base="dense"),
    Setting("sgpt50-int8-search", "sparsegpt 50% + int8 joint, searched", dict(method="sparsegpt", sparsity=0.5,
            quantize="int8", clip_search=True), base="sgpt50"),
    Setting("sgpt50-int4-search", "sparsegpt 50% + int4-g128 joint, searched", dict(method="sparsegpt", sparsity=0.5,
            quantize="int4", clip_search=True), base="sgpt50"),
    Setting("sgpt24-int4-search", "sparsegpt 2:4 + int4-g128 joint, searched", dict(method="sparsegpt", pattern="2:4",
            quantize="int4", clip_search=True), base="sgpt24"),
]
LABELS = {setting.key: setting.label for setting in SETTINGS}


@dataclass
class Row:
    label: str
    seconds: float
    sparsity: float
    perplexity: dict[str, float]
    protocol: str
    file_bytes: int | None = None  # the compressed weights file `save_pruned` writes (zstd codec)


def round_after(model: nn.Module, report, scheme_name: str) -> dict:
    """Prune-then-RTN: every pruned layer's kept weights, then the embeddings, rounded to nearest; the grids."""
    from sparsetorch.oneshot.quantized import quantize_embeddings, round_layer
    from sparsetorch.quantize import parse_scheme
    from sparsetorch.targets import set_weight_matrix, weight_matrix

    scheme = parse_scheme(scheme_name, group_size=128 if scheme_name == "int4" else None)
    modules, grids = dict(model.named_modules()), {}
    for name, keep in report.masks.items():
        rounded, grids[name] = round_layer(weight_matrix(modules[name]), keep, scheme)
        set_weight_matrix(modules[name], rounded)
    return {**grids, **quantize_embeddings(model, skip=set(report.masks))}


def _run(setting: Setting, model: nn.Module, windows: torch.Tensor) -> tuple[float, float, int | None]:
    """Prune (and quantize) `model` in place as `setting` says; (seconds, sparsity, bytes of its
    compressed weights file; None for the dense model)."""
    import sparsetorch

    if setting.options is None:
        return 0.0, 0.0, None
    started = time.perf_counter()
    report = sparsetorch.prune(model, windows, progress=False, **setting.options)
    grids = report.grids
    if setting.rtn_after is not None:
        grids = round_after(model, report, setting.rtn_after)
    seconds = time.perf_counter() - started
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in report.masks]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return seconds, zeros, _file_bytes(model, report, grids)


def _file_bytes(model: nn.Module, report, grids: dict) -> int:
    """Size of the compressed weights file `save_pruned` writes for this model (default codec)."""
    import tempfile

    from sparsetorch.formats.checkpoint import COMPRESSED_DIR, WEIGHTS_FILE
    from sparsetorch.formats.pruned import save_pruned

    with tempfile.TemporaryDirectory(dir=WORK) as scratch:
        out = save_pruned(model, Path(scratch) / "model", report.to_dict(), grids=grids or None)
        return (out / COMPRESSED_DIR / WEIGHTS_FILE).stat().st_size


def _tiny_model(vocab: int) -> nn.Module:
    """A 2-block random Llama with the bundled tokenizer's vocabulary (for --smoke)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _data(args) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """(model, calibration windows, held-out windows per text): the bundled model, or a tiny one for --smoke."""
    from sparsetorch.data import calibration_windows, demo_text
    from sparsetorch.models import load_model

    if args.smoke:
        from transformers import AutoTokenizer

        from sparsetorch.models import demo_model_dir

        tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
        split = demo_text()
        windows = calibration_windows(tokenizer, split.calibration, args.samples, args.seqlen, seed=0)
        return _tiny_model(len(tokenizer)), windows, _texts(tokenizer, split, args.eval_tokens, args.seqlen)
    _, split, calibration, _ = prepare_data(args.samples, args.seqlen, args.eval_tokens, "quality-calib.pt")
    model, tokenizer, _ = load_model(None, progress=False)
    return model, torch.load(calibration), _texts(tokenizer, split, args.eval_tokens, args.seqlen)


def _load_rows(path: Path, protocol: str) -> dict[str, Row]:
    if not path.exists():
        return {}
    rows = [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {row.label: row for row in rows if row.protocol == protocol}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default: 64)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens per evaluation text (default: 16384)")
    parser.add_argument("--rows", nargs="+", choices=[s.key for s in SETTINGS], metavar="ROW",
                        help="run only these rows (default: all): "
                             + "; ".join(f"{s.key} ({s.label})" for s in SETTINGS).replace("%", "%%"))
    parser.add_argument("--resume", action="store_true", help="reuse finished rows of the same protocol")
    parser.add_argument("--smoke", action="store_true",
                        help=f"check the script on a tiny random Llama ({SMOKE['samples']} windows of "
                             f"{SMOKE['seqlen']} tokens, {SMOKE['eval_tokens']} tokens per text); nothing is kept")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    run_all(args)


def run_all(args) -> None:
    from sparsetorch.evaluate.perplexity import perplexity

    started = time.time()
    protocol = f"samples={args.samples} seqlen={args.seqlen} eval={args.eval_tokens}"
    rows_file = WORK / "quality_quant_smoke.jsonl" if args.smoke else ROWS
    WORK.mkdir(exist_ok=True)
    if not args.resume and rows_file.exists():
        rows_file.unlink()
    done = _load_rows(rows_file, protocol)
    model, windows, texts = _data(args)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    wanted = [s for s in SETTINGS if args.rows is None or s.key in args.rows]
    rows = []
    for setting in wanted:
        if setting.label in done:
            rows.append(done[setting.label])
            continue
        model.load_state_dict(dense_state)
        seconds, sparsity, file_bytes = _run(setting, model, windows)
        measured = {name: perplexity(model, ids, progress=False) for name, ids in texts.items()}
        rows.append(Row(setting.label, seconds, sparsity, measured, protocol, file_bytes))
        _keep(rows_file, rows[-1])
    if args.smoke:
        rows_file.unlink(missing_ok=True)
    minutes = (time.time() - started) / 60
    dense_file = _dense_file_bytes(args.smoke)
    publish([*header("Joint pruning + quantization, SmolLM2-135M-Instruct", "quality_quant.py"),
             f"Data: {args.samples} calibration windows × {args.seqlen} tokens from the calibration plays; "
             f"perplexity on {args.eval_tokens} tokens of each text, windows of {args.seqlen}; 'dense' layer "
             f"inputs; int4 is int4-g128 (symmetric, fp16 scales), int8 one scale per output channel; quantized rows "
             f"also hold int8 embeddings; zeros: the pruned layers' weights that are exactly 0 (pruned, or kept and "
             f"rounded to 0); file: the compressed weights file `save_pruned` writes (zstd codec) against the "
             f"dense fp32 model.safetensors ({dense_file / 1e6:.1f} MB); total {minutes:.0f} min.", "",
             *_table(rows, dense_file), ""],
            append=not (args.no_append or args.smoke))


def _keep(path: Path, row: Row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(asdict(row)) + "\n")
    print(f"{row.label:34s} {row.seconds:6.1f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in row.perplexity.items()),
          flush=True)


def _dense_file_bytes(smoke: bool) -> int:
    """The dense fp32 weights file users start from (the bundled model's; 4 bytes per parameter for --smoke)."""
    from sparsetorch.models import demo_model_dir

    if smoke:
        return 4 * sum(p.numel() for p in _tiny_model(49152).parameters())
    return (demo_model_dir() / "model.safetensors").stat().st_size


def _table(rows: list[Row], dense_file: int) -> list[str]:
    dense = next((row for row in rows if row.label == "dense"), None)
    by_label = {row.label: row for row in rows}
    bases = {setting.label: by_label.get(LABELS.get(setting.base)) for setting in SETTINGS}
    names = list(rows[0].perplexity)
    lines = ["| setting | zeros | " + " | ".join(f"{n} ppl" + (" (× dense)" if dense else "") for n in names)
             + " | × its unquantized row, per text | file MB (× dense fp32) | prune s |",
             "|---|---|" + "---|" * len(names) + "---|---|---|"]
    for row in rows:
        cells = " | ".join(f"{row.perplexity[n]:.2f}" + (f" ({row.perplexity[n] / dense.perplexity[n]:.3f}×)"
                                                         if dense else "") for n in names)
        base = bases.get(row.label)
        versus = "–" if base is None else " / ".join(f"{row.perplexity[n] / base.perplexity[n]:.3f}×" for n in names)
        size = dense_file if row.file_bytes is None else row.file_bytes
        lines.append(f"| {row.label} | {row.sparsity:.2%} | {cells} | {versus} | {size / 1e6:.1f} "
                     f"({size / dense_file:.3f}×) | {row.seconds:.1f} |")
    return lines


if __name__ == "__main__":
    main()
