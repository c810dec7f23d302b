"""Our CPU runtime against llama.cpp, on the same models, in the same run (issue 15).

    pip install -e ".[llm,bench]"                                          # sentencepiece, for llama.cpp's converter
    flock /work/cpu.lock python benchmarks/cpu_decode.py --perplexity      # everything; appends to RESULTS.md
    python benchmarks/cpu_decode.py --models 135m --variants dense-fp32 50-int8 --repeats 1 \\
        --decode-tokens 8 --prefill-tokens 32 --no-append                  # a smoke test
    python benchmarks/cpu_decode.py --resume                               # keep finished measurements
    python benchmarks/cpu_decode.py --llamacpp ~/llama.cpp/build           # an existing llama.cpp build

Models: the bundled SmolLM2-135M-Instruct, and a Llama with random weights in TinyLlama-1.1B's
shape (the bundled tokenizer's vocabulary, untied lm_head), so that per-token overhead cannot
hide behind a small model. Ours: `sparsetorch.prune` output directories (the 135M by SparseGPT
with the library's calibration defaults, the 1B by magnitude: speed does not depend on the
values), run by `sparsetorch bench`'s worker in a fresh process per run: 'dense' runs a
model.safetensors with dense matmuls, every other row the compressed runtime. Theirs: GGUF files
written by llama.cpp's own converter (F32, BF16, Q8_0; Q4_0 by `llama-quantize` from the F32
file), measured by `llama-bench -r 1`. llama.cpp is built once from the source archive of
`llama-cpp-python` (see `llamacpp.py`). Each repeat runs every variant once, ours then theirs,
so slow drifts of the machine hit all alike; the table holds medians over the repeats.

Columns: file MB, what the variant loads (our compressed weights, model.safetensors for our dense
rows, the GGUF file); prefill tok/s, one `--prefill-tokens` window at batch 1; decode tok/s,
greedy decode of `--decode-tokens` tokens at batch 1 (ours after a short prompt, llama-bench's
from an empty context); 'decode vs F32 / Q8_0 / Q4_0', decode speed over that llama.cpp variant's;
'prefill vs same width', prefill speed over llama.cpp's dense variant of the same bit width;
perplexity (`--perplexity`, the 135M only): `llama-perplexity` on the held-out plays for every
row, ours converted from the pruned directory's dense weights (the quantized values, dequantized)
to a GGUF F32 file, so every number in the column is computed by the same code. A second table
checks the issue's bars, with pass or miss. Finished measurements are kept in
benchmarks/_work/cpu_decode/rows.jsonl for `--resume`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import llamacpp
from results import header, publish

WORK = Path(__file__).parent / "_work" / "cpu_decode"
ROWS = WORK / "rows.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class ModelSpec:
    """One model: how our variants are pruned, and whether their dense form is kept on disk."""

    key: str
    label: str
    method: str
    keep_dense: bool  # the 1B's dense form (4.7 GB per variant) goes: the runtime reads compressed/ only


MODELS = {
    "135m": ModelSpec("135m", "SmolLM2-135M-Instruct (bundled)", "sparsegpt", keep_dense=True),
    "1b": ModelSpec("1b", "random Llama of TinyLlama-1.1B's shape", "magnitude", keep_dense=False),
}


@dataclass(frozen=True)
class Ours:
    """One of our variants: `prune` options (None: the original weights), the bench worker's variant
    ('dense' or 'sparse'), llama.cpp's type of the same bit width, and why it cannot run yet (if so)."""

    key: str
    label: str
    width: str
    prune: dict | None
    runtime: str = "sparse"
    missing: str | None = None


OURS = (
    Ours("dense-fp32", "dense fp32", "F32", None, runtime="dense"),
    Ours("dense-bf16", "dense bf16", "BF16", None, runtime="dense-bf16"),
    Ours("dense-int8", "dense int8", "Q8_0", dict(sparsity=0.0, quantize="int8")),
    Ours("dense-int4", "dense int4-g128", "Q4_0", dict(sparsity=0.0, quantize="int4", group_size=128)),
    Ours("50-fp32", "50% fp32", "F32", dict(sparsity=0.5)),
    Ours("50-int8", "50% + int8", "Q8_0", dict(sparsity=0.5, quantize="int8")),
    Ours("24-int4", "2:4 + int4-g128", "Q4_0", dict(pattern="2:4", quantize="int4", group_size=128)),
    Ours("70-int4", "70% + int4-g128", "Q4_0", dict(sparsity=0.7, quantize="int4", group_size=128)),
)
THEIRS = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": None}  # --outtype; None: llama-quantize from F32
BARS = {  # model -> (our variant, llama.cpp's, decode speed ours / theirs needed)
    "135m": (("dense-fp32", "F32", 1.0), ("50-int8", "Q8_0", 1.0)),
    "1b": (("50-int8", "Q8_0", 1.3), ("24-int4", "Q4_0", 1.15), ("70-int4", "Q4_0", 1.5), ("dense-bf16", "BF16", 1.0)),
}
PREFILL_BAR = 0.8  # our prefill over llama.cpp's dense variant of the same bit width, every row


@dataclass(frozen=True)
class Runnable:
    """A row of the table: what runs it ('ours' or 'llama.cpp'), and the directory or GGUF file it loads."""

    engine: str
    key: str
    label: str
    width: str
    path: Path | None
    runtime: str | None = None
    missing: str | None = None

    @property
    def name(self) -> str:
        return f"{self.engine} {self.label}"

    def file_bytes(self) -> int:
        from sparsetorch.formats.checkpoint import COMPRESSED_DIR, WEIGHTS_FILE

        if self.engine == "llama.cpp":
            return self.path.stat().st_size
        dense = self.runtime in ("dense", "dense-bf16")  # bf16: rounded from the fp32 file as it loads
        return (self.path / (WEIGHTS_FILE if dense else f"{COMPRESSED_DIR}/{WEIGHTS_FILE}")).stat().st_size


# ---- the models ----

def llama_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every weight of a Hugging Face Llama and its shape, in the order of its state dict."""
    h, heads, kv = config.hidden_size, config.num_attention_heads * config.head_dim, \
        config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        block = {"self_attn.q_proj": (heads, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, heads), "mlp.gate_proj": (config.intermediate_size, h),
                 "mlp.up_proj": (config.intermediate_size, h), "mlp.down_proj": (h, config.intermediate_size),
                 "input_layernorm": (h,), "post_attention_layernorm": (h,)}
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in block.items()}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (config.vocab_size, h)}


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], std: float = 0.02, seed: int = 0) -> None:
    """An fp32 safetensors file of N(0, std) matrices and all-ones vectors (the norms), written one
    tensor at a time: memory holds the largest tensor, never the model."""
    entries, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for shape in shapes.values():
            tensor = torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0, std, generator=generator)
            f.write(tensor.numpy().data)


def random_llama(out: Path) -> Path:
    """The TinyLlama-1.1B-shaped Llama with random weights and the bundled tokenizer, written once."""
    if (out / ".complete").exists():
        return out
    from tokenizers import Tokenizer
    from transformers import LlamaConfig

    from sparsetorch.models import demo_model_dir

    demo = demo_model_dir(progress=False)
    vocab = Tokenizer.from_file(str(demo / "tokenizer.json")).get_vocab_size()
    print(f"==> writing a random Llama of TinyLlama-1.1B's shape (vocabulary {vocab}) to {out}", flush=True)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config = LlamaConfig(vocab_size=vocab, architectures=["LlamaForCausalLM"], **TINYLLAMA)
    config.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        shutil.copy(demo / name, staging / name)
    write_random_safetensors(staging / "model.safetensors", llama_shapes(config))
    (staging / ".complete").write_text("random N(0, 0.02) weights, norms 1, seed 0\n")
    staging.rename(out)
    return out


def model_dir(spec: ModelSpec) -> Path:
    from sparsetorch.models import demo_model_dir

    return demo_model_dir() if spec.key == "135m" else random_llama(WORK / "1b" / "model")


# ---- our variants ----

def _calibration(spec: ModelSpec, tokenizer, args) -> tuple[torch.Tensor | None, dict]:
    """The calibration windows `sparsetorch prune` would draw (none for magnitude), and their record."""
    if spec.method == "magnitude":
        return None, {"source": None, "note": "magnitude needs no calibration data"}
    from sparsetorch.data import calibration_windows, demo_text

    split = demo_text()
    windows = calibration_windows(tokenizer, split.calibration, args.calib_samples, args.calib_seqlen, seed=0)
    return windows, {"source": split.source, "parts": list(split.calibration_parts), "samples": args.calib_samples,
                     "seqlen": args.calib_seqlen, "seed": 0}


def pruned_dir(spec: ModelSpec, variant: Ours, source: Path, args) -> Path:
    """`variant` of the model in `source` as a `sparsetorch prune` output directory, made once."""
    calib = "" if spec.method == "magnitude" else f"-{args.calib_samples}x{args.calib_seqlen}"
    out = WORK / spec.key / f"ours-{variant.key}-{spec.method}{calib}"
    if (out / "sparsity.json").exists():
        return out
    import sparsetorch
    from sparsetorch.formats.pruned import save_pruned
    from sparsetorch.models import load_model

    print(f"==> {spec.key}: pruning {variant.label} with {spec.method} into {out}", flush=True)
    model, tokenizer, path = load_model(str(source), progress=False)
    windows, calibration = _calibration(spec, tokenizer, args)
    report = sparsetorch.prune(model, windows, method=spec.method, progress=False, **variant.prune)
    save_pruned(model, out, report.to_dict(), tokenizer=tokenizer, calibration=calibration, source=str(path),
                overwrite=True, grids=report.grids or None)
    if not spec.keep_dense:
        (out / "model.safetensors").unlink()
    return out


def our_rows(spec: ModelSpec, keys: list[str], source: Path, args) -> list[Runnable]:
    rows = []
    for variant in (v for v in OURS if v.key in keys):
        path = None if variant.missing else source if variant.prune is None else pruned_dir(spec, variant, source, args)
        rows.append(Runnable("ours", variant.key, variant.label, variant.width, path, variant.runtime, variant.missing))
    return rows


# ---- llama.cpp's variants ----

def gguf(tools: llamacpp.Tools, source: Path, kind: str, out: Path, threads: int) -> Path:
    """`source` as a GGUF file of `kind` (F32, BF16, Q8_0 by the converter; Q4_0 from the F32 file), made once."""
    if out.exists():
        return out
    print(f"==> GGUF {kind}: {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if THEIRS[kind] is not None:
        return tools.convert(source, THEIRS[kind], out)
    return tools.quantize(gguf(tools, source, "F32", out.with_name("llamacpp-F32.gguf"), threads), kind, out, threads)


def their_rows(spec: ModelSpec, kinds: list[str], tools: llamacpp.Tools, source: Path, threads: int) -> list[Runnable]:
    return [Runnable("llama.cpp", kind, kind, kind, gguf(tools, source, kind, WORK / spec.key / f"llamacpp-{kind}.gguf",
                                                          threads)) for kind in THEIRS if kind in kinds]


def their_kinds(keys: list[str], model: str) -> list[str]:
    """llama.cpp's variants the chosen ones of ours are compared with: their widths and their bars."""
    widths = {v.width for v in OURS if v.key in keys}
    return [kind for kind in THEIRS if kind in widths | {t for o, t, _ in BARS[model] if o in keys}]


# ---- measuring ----

def measure_ours(row: Runnable, ids: dict, args, scratch: Path) -> dict:
    """One fresh bench-worker process (`sparsetorch bench`'s): medians of its prefill and decode."""
    from sparsetorch.evaluate.bench import BenchConfig, run_variant, summarize_runs
    from sparsetorch.runtime import RuntimeConfig

    config = BenchConfig(prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, repeats=1, rounds=1,
                         runtime=RuntimeConfig(batch_sizes=(1,)), decoder="lean")
    run = run_variant(row.path, row.runtime, config, scratch / f"{row.key}.json", ids)
    if run["threads"] != args.threads:
        raise RuntimeError(f"the bench worker ran {run['threads']} threads, not {args.threads}")
    result = summarize_runs(row.runtime, [run], row.file_bytes())
    return {"prefill": result.prefill_tokens_per_second, "decode": result.decode_tokens_per_second,
            "note": run.get("summary", "")}


def measure(row: Runnable, ids: dict, tools: llamacpp.Tools, args, scratch: Path) -> dict:
    if row.engine == "ours":
        return measure_ours(row, ids, args, scratch)
    return tools.bench(row.path, args.threads, args.prefill_tokens, args.decode_tokens)


@dataclass
class Record:
    """One measurement, kept in rows.jsonl: speed (repeat >= 1) or perplexity (repeat 0)."""

    protocol: str
    model: str
    engine: str
    variant: str
    repeat: int
    values: dict

    @property
    def key(self) -> tuple:
        return self.protocol, self.model, self.engine, self.variant, self.repeat


def load_records(resume: bool) -> dict[tuple, Record]:
    if not resume:
        ROWS.unlink(missing_ok=True)
    if not ROWS.exists():
        return {}
    records = [Record(**json.loads(line)) for line in ROWS.read_text().splitlines() if line.strip()]
    return {record.key: record for record in records}


def keep(records: dict[tuple, Record], record: Record) -> None:
    records[record.key] = record
    with open(ROWS, "a") as f:
        f.write(json.dumps(asdict(record)) + "\n")


def time_all(spec: ModelSpec, rows: list[Runnable], tools: llamacpp.Tools, records: dict, args) -> None:
    """Every runnable row once per repeat, ours then llama.cpp's, skipping finished measurements."""
    from sparsetorch.evaluate.bench_worker import token_ids

    protocol = speed_protocol(args)
    ids = token_ids(model_dir(spec), "lean", args.prefill_tokens)
    with tempfile.TemporaryDirectory(prefix="cpu-decode-") as scratch:
        for repeat in range(1, args.repeats + 1):
            for row in (r for r in rows if r.missing is None):
                record = Record(protocol, spec.key, row.engine, row.key, repeat, {})
                if record.key in records:
                    continue
                record.values = {**measure(row, ids, tools, args, Path(scratch)), "file_bytes": row.file_bytes()}
                keep(records, record)
                print(f"[{spec.key} {repeat}/{args.repeats}] {row.name:28s} prefill {record.values['prefill']:8.1f} "
                      f"tok/s  decode {record.values['decode']:7.2f} tok/s", flush=True)


def speed_protocol(args) -> str:
    return f"threads={args.threads} prefill={args.prefill_tokens} decode={args.decode_tokens}"


# ---- perplexity ----

def ppl_protocol(args) -> str:
    return f"llama-perplexity c={args.ppl_context} chunks={args.ppl_chunks}"


def heldout_file() -> Path:
    """The bundled held-out plays as a text file, for llama-perplexity."""
    from sparsetorch.data import demo_text

    path = WORK / "heldout.txt"
    if not path.exists():
        path.write_text(demo_text().evaluation)
    return path


def ppl_gguf(spec: ModelSpec, row: Runnable, source: Path, tools: llamacpp.Tools, args) -> tuple[Path, bool]:
    """(GGUF file whose perplexity is row's, whether it is a temporary to delete): llama.cpp's own
    file, or our directory's dense weights as F32 (the original weights: llama.cpp's F32 file)."""
    if row.engine == "llama.cpp":
        return row.path, False
    if row.path == source:
        return gguf(tools, row.path, "F32", WORK / spec.key / "llamacpp-F32.gguf", args.threads), False
    out = WORK / spec.key / f"ppl-{row.key}.gguf"
    return (out if out.exists() else tools.convert(row.path, "f32", out)), True


def perplexities(spec: ModelSpec, rows: list[Runnable], source: Path, tools: llamacpp.Tools, records: dict,
                 args) -> None:
    """llama-perplexity of every runnable row on the held-out text (cached like the timings)."""
    text = heldout_file()
    for row in (r for r in rows if r.missing is None and r.runtime != "dense-bf16"):  # rounded as it loads: no file
        record = Record(ppl_protocol(args), spec.key, row.engine, row.key, 0, {})
        if record.key in records:
            continue
        path, temporary = ppl_gguf(spec, row, source, tools, args)
        record.values = tools.perplexity(path, text, args.ppl_context, args.ppl_chunks, args.threads)
        keep(records, record)
        print(f"[{spec.key} perplexity] {row.name:28s} {record.values['ppl']:.3f}", flush=True)
        if temporary:
            path.unlink()


# ---- the tables ----

def medians(spec: ModelSpec, rows: list[Runnable], records: dict, args) -> dict[str, dict]:
    """{row name: {'prefill', 'decode', 'file_bytes', 'ppl', 'note'}} over the repeats measured."""
    out = {}
    for row in rows:
        runs = [records.get((speed_protocol(args), spec.key, row.engine, row.key, r)) for r in range(1, args.repeats + 1)]
        runs = [r.values for r in runs if r is not None]
        ppl = records.get((ppl_protocol(args), spec.key, row.engine, row.key, 0))
        out[row.name] = {"ppl": ppl.values if ppl else None, **({
            "prefill": statistics.median(r["prefill"] for r in runs), "decode": statistics.median(r["decode"] for r in runs),
            "file_bytes": runs[0]["file_bytes"], "note": runs[0].get("note", "")} if runs else {})}
    return out


def ratio(a: dict | None, b: dict | None, what: str) -> float | None:
    if not a or not b or what not in a or what not in b:
        return None
    return a[what] / b[what]


def verdict(measured: float | None, needed: float) -> str:
    """'pass' when `measured` reaches `needed`, 'miss' below it, 'not measured' without a number.

    Example:
        >>> verdict(1.31, 1.3), verdict(1.29, 1.3), verdict(None, 1.3)
        ('pass', 'miss', 'not measured')
    """
    if measured is None:
        return "not measured"
    return "pass" if measured >= needed else "miss"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def speed_table(rows: list[Runnable], measured: dict[str, dict], kinds: list[str]) -> list[str]:
    ratios = [k for k in ("F32", "Q8_0", "Q4_0") if k in kinds]
    lines = ["| engine | variant | file MB | prefill tok/s | decode tok/s | "
             + " | ".join(f"decode vs {k}" for k in ratios) + " | prefill vs same width | perplexity |",
             "|---|---|---|---|---|" + "---|" * len(ratios) + "---|---|"]
    for row in rows:
        m = measured[row.name]
        if row.missing or "decode" not in m:
            why = f"not supported: {row.missing}" if row.missing else "not measured"
            lines.append(f"| {row.engine} | {row.label} | {why} |" + " – |" * (len(ratios) + 4))
            continue
        cells = " | ".join(_x(ratio(m, measured.get(f"llama.cpp {k}"), "decode")) for k in ratios)
        same = _x(ratio(m, measured.get(f"llama.cpp {row.width}"), "prefill"))
        ppl = "–" if m["ppl"] is None else f"{m['ppl']['ppl']:.3f}"
        lines.append(f"| {row.engine} | {row.label} | {m['file_bytes'] / 1e6:.1f} | {m['prefill']:.1f} "
                     f"| {m['decode']:.2f} | {cells} | {same} | {ppl} |")
    return lines


def bar_table(model: str, rows: list[Runnable], measured: dict[str, dict]) -> list[str]:
    labels = {v.key: v.label for v in OURS}
    chosen = {r.key for r in rows if r.engine == "ours"}
    missing = {r.key for r in rows if r.missing}
    bars = [("decode", o, t, need) for o, t, need in BARS[model] if o in chosen]
    bars += [("prefill", r.key, r.width, PREFILL_BAR) for r in rows if r.engine == "ours"]
    lines = ["| bar | ours / llama.cpp | needed | verdict |", "|---|---|---|---|"]
    for what, o, t, need in bars:
        got = ratio(measured.get(f"ours {labels[o]}"), measured.get(f"llama.cpp {t}"), what)
        result = "not supported by ours yet" if o in missing else verdict(got, need)
        lines.append(f"| {what}: ours {labels[o]} vs llama.cpp {t} | {_x(got)} | ≥ {need:.2f}× | {result} |")
    return lines


def model_section(spec: ModelSpec, rows: list[Runnable], kinds: list[str], records: dict, args) -> list[str]:
    measured = medians(spec, rows, records, args)
    notes = [f"- {name}: {m['note']}" for name, m in measured.items() if m.get("note")]
    return [f"### {spec.label}", "", *speed_table(rows, measured, kinds), "", *bar_table(spec.key, rows, measured),
            "", *notes, ""]


# ---- the run ----

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=[v.key for v in OURS], default=[v.key for v in OURS],
                        metavar="VARIANT", help="our variants (default: all): " + ", ".join(v.key for v in OURS)
                        + "; llama.cpp runs the types they are compared with")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant, alternating (default: 3)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="threads of both runtimes (default: 2)")
    parser.add_argument("--calib-samples", type=int, default=64, help="SparseGPT's windows, 135M (default: 64)")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--perplexity", action="store_true", help="llama-perplexity of every 135M row")
    parser.add_argument("--ppl-context", type=int, default=512, help="llama-perplexity's -c (default: 512)")
    parser.add_argument("--ppl-chunks", type=int, default=32, help="windows of --ppl-context tokens (default: 32)")
    parser.add_argument("--llamacpp", type=Path, metavar="DIR", help="an existing llama.cpp build directory")
    parser.add_argument("--resume", action="store_true", help="keep finished measurements of the same settings")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the bench workers' torch threads (they inherit it)
    WORK.mkdir(parents=True, exist_ok=True)
    tools = llamacpp.Tools(args.llamacpp or llamacpp.build())
    records = load_records(args.resume)
    sections = []
    for spec in (MODELS[key] for key in args.models):
        source, kinds = model_dir(spec), their_kinds(args.variants, spec.key)
        rows = our_rows(spec, args.variants, source, args) + their_rows(spec, kinds, tools, source, args.threads)
        time_all(spec, rows, tools, records, args)
        if args.perplexity and spec.key == "135m":
            perplexities(spec, rows, source, tools, records, args)
        sections += model_section(spec, rows, kinds, records, args)
    publish([*header("CPU decode: our runtime vs llama.cpp", "cpu_decode.py"), notes(tools, args), "", *sections],
            append=not args.no_append)


def notes(tools: llamacpp.Tools, args) -> str:
    ppl = (f" Perplexity: `llama-perplexity -c {args.ppl_context} --chunks {args.ppl_chunks}` on the held-out plays "
           f"(the second half of each window scored: {args.ppl_chunks * (args.ppl_context - 1 - args.ppl_context // 2)} "
           "tokens), every row from a GGUF F32 file of its weights, ours dequantized." if args.perplexity else "")
    return (f"llama.cpp {tools.version()} from llama-cpp-python {llamacpp.VERSION}'s source, built here "
            f"(GGML_NATIVE, Release, static); `llama-bench -t {args.threads} -p {args.prefill_tokens} "
            f"-n {args.decode_tokens} -r 1` per repeat. Ours: `sparsetorch bench`'s worker (lean decoder, compressed "
            f"runtime decided at batch 1; 'dense fp32' = the original model.safetensors, 'dense bf16' = its Linear "
            f"weights rounded to bf16 as it loads, fp32 activations), {args.threads} threads, "
            f"a fresh process per run. Batch 1; {args.repeats} repeats, each running every variant once in turn "
            f"(ours, then llama.cpp's); medians. 135M pruned by SparseGPT on {args.calib_samples} × "
            f"{args.calib_seqlen}-token calibration windows, the 1B (random weights) by magnitude; quantized rows "
            "also round the embeddings (and the 1B's untied lm_head) to int8 per row, the library's default; "
            f"lm_head is never pruned.{ppl}")


if __name__ == "__main__":
    main()
