"""The pure parts of benchmarks/cpu_decode.py and benchmarks/llamacpp.py: parsing llama.cpp's output,
the verdicts, and the random Llama's file (no llama.cpp, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cpu_decode
    import llamacpp

    yield cpu_decode, llamacpp
    for name in ("cpu_decode", "llamacpp", "results"):
        sys.modules.pop(name, None)


BENCH_JSON = """[
  {"n_prompt": 256, "n_gen": 0, "n_threads": 2, "avg_ts": 310.5, "samples_ts": [310.5]},
  {"n_prompt": 0, "n_gen": 128, "n_threads": 2, "avg_ts": 41.25, "samples_ts": [41.25]}
]"""


def test_parse_bench_picks_prefill_and_decode(scripts):
    _, llamacpp = scripts
    assert llamacpp.parse_bench(BENCH_JSON, 256, 128) == {"prefill": 310.5, "decode": 41.25}


def test_parse_bench_names_the_missing_test(scripts):
    _, llamacpp = scripts
    with pytest.raises(ValueError, match=r"no decode \(n_prompt=0, n_gen=64\) test"):
        llamacpp.parse_bench(BENCH_JSON, 256, 64)


def test_parse_perplexity(scripts):
    _, llamacpp = scripts
    log = ("perplexity: calculating perplexity over 4 chunks, n_ctx=512, batch_size=2048, n_seq=4\n"
           "[1]20.1,[2]19.8,[3]19.7,[4]19.6,\nFinal estimate: PPL = 19.6123 +/- 0.45678\n")
    assert llamacpp.parse_perplexity(log) == {"ppl": 19.6123, "error": 0.45678, "chunks": 4, "context": 512,
                                              "scored_tokens": 4 * 255}


def test_parse_perplexity_without_estimate(scripts):
    _, llamacpp = scripts
    with pytest.raises(ValueError, match="no perplexity"):
        llamacpp.parse_perplexity("main: error: failed to load model\n")


def test_verdict(scripts):
    cpu_decode, _ = scripts
    assert cpu_decode.verdict(1.3, 1.3) == "pass"
    assert cpu_decode.verdict(1.29, 1.3) == "miss"
    assert cpu_decode.verdict(None, 1.3) == "not measured"


def test_their_kinds_follow_widths_and_bars(scripts):
    cpu_decode, _ = scripts
    assert cpu_decode.their_kinds(["dense-fp32", "50-int8"], "135m") == ["F32", "Q8_0"]
    assert cpu_decode.their_kinds(["dense-bf16", "70-int4"], "1b") == ["BF16", "Q4_0"]


def test_tinyllama_shape_has_its_parameter_count(scripts):
    from transformers import LlamaConfig

    cpu_decode, _ = scripts
    shapes = cpu_decode.llama_shapes(LlamaConfig(vocab_size=32000, **cpu_decode.TINYLLAMA))
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_100_048_384  # TinyLlama-1.1B's


def test_random_safetensors_reads_back(scripts, tmp_path):
    cpu_decode, _ = scripts
    path = tmp_path / "model.safetensors"
    cpu_decode.write_random_safetensors(path, {"w": (3, 5), "norm": (5,)}, std=0.02, seed=0)
    state = load_file(path)
    assert state["w"].shape == (3, 5) and state["w"].dtype == torch.float32
    assert torch.equal(state["norm"], torch.ones(5))
    expected = torch.empty(3, 5).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state["w"], expected)
