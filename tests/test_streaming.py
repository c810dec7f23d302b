"""Streaming prune (`oneshot/streaming.py`): the same files as an in-memory prune + save_pruned, from a
model split over several shards; resuming without reading finished blocks; peak memory one block's."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import calibration_ids, tiny_llama
from sparsetorch.formats.pruned import save_pruned
from sparsetorch.formats.sharded import ShardedWeights
from sparsetorch.oneshot import PruneConfig, pipeline, prune
from sparsetorch.oneshot.streaming import memory_bound, prune_directory
from test_faults import LAYERS, _assert_same, _command, _env, _run_and_kill, _tensors

FILES = ["config.json", "generation_config.json", "model.safetensors", "compressed/config.json",
         "compressed/model.safetensors", "compressed/sparsetorch.json"]


def _sharded(root: Path, tie: bool = False, dtype=torch.float32, layers: int = 3) -> Path:
    source = root / "source"
    tiny_llama(layers=layers, tie=tie).to(dtype).save_pretrained(source, max_shard_size="60KB")
    return source


def _in_memory(source: Path, out: Path, config: PruneConfig, ids, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    report = prune(model, ids, config, progress=False)
    save_pruned(model, out, report.to_dict(), source=str(source), grids=report.grids or None)
    return report


def _record(path: Path) -> dict:
    """sparsity.json without its timings and memory."""
    record = json.loads((path / "sparsity.json").read_text())
    record.pop("seconds")
    record.pop("memory", None)
    for layer in record["layers"].values():
        layer.pop("seconds")
    return record


def _assert_same_output(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _record(a) == _record(b)


@pytest.mark.parametrize("method, pattern", [("magnitude", "unstructured"), ("wanda", "unstructured-row"),
                                             ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "4:8"),
                                             ("magnitude", "block-4x4")])
def test_streamed_prune_writes_the_in_memory_files(tmp_path, method, pattern):
    source = _sharded(tmp_path)
    assert len(list(source.glob("model-*.safetensors"))) > 3
    config, ids = PruneConfig(method=method, pattern=pattern), calibration_ids()
    _in_memory(source, tmp_path / "memory", config, ids)
    report = prune_directory(source, tmp_path / "streamed", ids, config, progress=False)
    _assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    assert len(report.masks) == 0  # written, not held


def test_streamed_tied_and_quantized_with_embeddings(tmp_path):
    source = _sharded(tmp_path, tie=True)
    config, ids = PruneConfig(method="sparsegpt", pattern="2:4", quantize="int8"), calibration_ids()
    _in_memory(source, tmp_path / "memory", config, ids)
    report = prune_directory(source, tmp_path / "streamed", ids, config, progress=False)
    _assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    assert "model.embed_tokens" in report.grids


def test_streamed_keeps_the_stored_dtype(tmp_path):
    source = _sharded(tmp_path, dtype=torch.bfloat16)
    config, ids = PruneConfig(method="wanda"), calibration_ids()
    _in_memory(source, tmp_path / "memory", config, ids, dtype=torch.bfloat16)
    prune_directory(source, tmp_path / "streamed", ids, config, progress=False)
    _assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    with ShardedWeights(tmp_path / "streamed") as weights:
        assert weights.spec("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16


def _resumed_after_block_2(source: Path, tmp_path: Path, ids, config: PruneConfig, monkeypatch) -> list[str]:
    """Stream into tmp_path/'resumed', interrupted in block 2, then resume it; the tensor names the
    resumed run read from the source."""
    real = pipeline._LayerPruner.prune_group

    def interrupt(self, modules, stat):
        if self.names[modules[0]].startswith("model.layers.2."):
            raise KeyboardInterrupt
        return real(self, modules, stat)

    monkeypatch.setattr(pipeline._LayerPruner, "prune_group", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune_directory(source, tmp_path / "resumed", ids, config, progress=False, resume=tmp_path / "ckpt")
    assert not (tmp_path / "resumed").exists() and (tmp_path / "ckpt" / "progress.json").exists()
    monkeypatch.setattr(pipeline._LayerPruner, "prune_group", real)
    reads = []
    tensor = ShardedWeights.tensor
    monkeypatch.setattr(ShardedWeights, "tensor", lambda self, name, dtype=None: reads.append(name) or
                        tensor(self, name, dtype))
    prune_directory(source, tmp_path / "resumed", ids, config, progress=False, resume=tmp_path / "ckpt")
    return reads


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_resume_writes_finished_blocks_from_the_checkpoint_without_reading_them(tmp_path, monkeypatch, method):
    source = _sharded(tmp_path, layers=4)
    config = PruneConfig(method=method)
    ids = calibration_ids() if config.calibrated else None
    prune_directory(source, tmp_path / "whole", ids, config, progress=False)
    reads = _resumed_after_block_2(source, tmp_path, ids, config, monkeypatch)
    finished = [name for name in reads if name.startswith(("model.layers.0.", "model.layers.1."))]
    assert all("layernorm" in name for name in finished)  # the pruned weights come from the checkpoint
    assert any(name.startswith("model.layers.3.mlp") for name in reads)
    _assert_same_output(tmp_path / "whole", tmp_path / "resumed")
    assert not (tmp_path / "ckpt").exists()


def test_streaming_refuses_what_it_cannot_run(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(NotImplementedError, match="in memory"):
        prune_directory(tmp_path / "gpt2", tmp_path / "out", method="magnitude", progress=False)
    assert not (tmp_path / "out").exists()


def test_streamed_owl_writes_the_in_memory_files_and_resumes_without_measuring_again(tmp_path, monkeypatch):
    """OWL measures every block before pruning any: streamed, a first pass loads and frees each block;
    a resumed run takes the sparsities from its checkpoint and reads no finished block."""
    source = _sharded(tmp_path, layers=4)
    config, ids = PruneConfig(method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1), calibration_ids()
    report = _in_memory(source, tmp_path / "memory", config, ids)
    assert len({round(layer.sparsity, 3) for layer in report.layers.values()}) > 1  # the blocks differ
    prune_directory(source, tmp_path / "streamed", ids, config, progress=False)
    _assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    reads = _resumed_after_block_2(source, tmp_path, ids, config, monkeypatch)
    finished = [name for name in reads if name.startswith(("model.layers.0.", "model.layers.1."))]
    assert all("layernorm" in name for name in finished)
    _assert_same_output(tmp_path / "memory", tmp_path / "resumed")


def test_memory_bound_counts_the_largest_block_and_what_lies_outside(tmp_path):
    source = _sharded(tmp_path)
    bound = memory_bound(source, PruneConfig(method="sparsegpt"), (8, 32))
    # q and o 64x64, k and v 32x64 (2 of 4 heads), three 64x128 MLP weights, two norms; fp32
    assert bound.block == (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) * 4
    assert bound.outside == (2 * 128 * 64 + 64) * 4  # embeddings, lm_head, final norm
    assert bound.activations == 2 * 8 * 32 * 64 * 4
    assert bound.statistics == (6 * 64 * 64 + 128 * 128) * 4


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    from sparsetorch.evaluate.memory import peak_rss_bytes
    from sparsetorch.formats.pruned import save_pruned
    from sparsetorch.oneshot import prune
    from sparsetorch.oneshot.streaming import prune_directory

    source, warm, out = (Path(a) for a in sys.argv[1:4])

    def fresh_peak():  # Linux: writing 5 to clear_refs resets the peak RSS to the current RSS
        open("/proc/self/clear_refs", "w").write("5")
        return peak_rss_bytes()

    prune_directory(warm, out / "warm", method="magnitude", progress=False, codec="none")  # load the code paths
    base = fresh_peak()
    prune_directory(source, out / "streamed", method="magnitude", progress=False, codec="none")
    streamed = peak_rss_bytes() - base
    base = fresh_peak()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    report = prune(model, None, method="magnitude", progress=False)
    save_pruned(model, out / "memory", report.to_dict(), codec="none")
    print(streamed, peak_rss_bytes() - base)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_streamed_peak_memory_stays_under_half_the_weights(tmp_path):
    """16 blocks of 2.6 MB: the in-memory prune holds all of them (and the save more), the streamed one
    a block or two. Each peak is measured from the RSS just before it, in one process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(path, layers):
        config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4)
        LlamaForCausalLM(config).save_pretrained(path, max_shard_size="10MB")

    save(tmp_path / "big", 16)
    save(tmp_path / "warm", 1)
    weights = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    args = [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "warm"), str(tmp_path / "out")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back to the system at once
    run = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    streamed, in_memory = (int(value) for value in run.stdout.split()[-2:])
    assert in_memory > weights  # the cap below is one the in-memory path exceeds
    assert streamed < 0.5 * weights, (streamed, in_memory, weights)
    print(f"peak RSS over the start: streamed {streamed / weights:.2f}x, in memory {in_memory / weights:.2f}x of {weights} B")


def test_streaming_leaves_transformers_model_classes_unimported(tmp_path):
    """A streamed prune needs transformers' config, not its model code (whose import alone is a large
    part of a small model's peak): a fresh process streams a model and has imported no modeling module."""
    source = _sharded(tmp_path)
    script = textwrap.dedent(f"""
        import sys, torch
        from sparsetorch.oneshot.streaming import memory_bound, prune_directory
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        memory_bound({str(source)!r}, __import__("sparsetorch").oneshot.PruneConfig(method="wanda"), (2, 16))
        prune_directory({str(source)!r}, {str(tmp_path / "out")!r}, ids, method="wanda", progress=False)
        print(sorted(name for name in sys.modules if name == "transformers.modeling_utils"
                     or name.startswith("transformers.models.") and ".modeling_" in name and ".auto." not in name))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[-2] == "[]"


def test_cli_stream_writes_what_the_in_memory_cli_writes(tiny_model_dir, text_files, tmp_path, capsys):
    from sparsetorch.cli import main

    def run(out, *extra):
        args = ["prune", str(tiny_model_dir), "--out", str(out), "--calib-text", str(text_files[0]),
                "--calib-samples", "8", "--seqlen", "32", "--method", "sparsegpt", "--quiet", *extra]
        assert main(args) == 0
        return capsys.readouterr().out

    printed = run(tmp_path / "streamed", "--stream")
    assert "streaming the model block by block (--stream)" in printed and "peak memory" in printed
    assert "streaming" not in run(tmp_path / "memory")  # a tiny model: in memory unless asked
    _assert_same_output(tmp_path / "memory", tmp_path / "streamed")
    for kind, streamed in (("streamed", True), ("memory", False)):
        memory = json.loads((tmp_path / kind / "sparsity.json").read_text())["memory"]
        assert memory["streamed"] is streamed and memory["peak_rss_bytes"] > 0 and memory["expected_bytes"] > 0
    for name in ("tokenizer.json", "compressed/tokenizer.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes()


def test_cli_streams_by_itself_when_the_weights_exceed_the_memory(tiny_model_dir, text_files, tmp_path, capsys,
                                                                   monkeypatch):
    from sparsetorch import cli

    monkeypatch.setattr(cli, "_available_memory", lambda: 1000)
    args = ["prune", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--method", "magnitude", "--quiet"]
    assert cli.main(args) == 0
    assert "exceed 50% of the available memory" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "sparsity.json").read_text())["memory"]["streamed"] is True


@pytest.fixture(scope="module")
def six_blocks(tmp_path_factory):
    from conftest import _train_tokenizer

    path = tmp_path_factory.mktemp("models") / "six"
    tokenizer = _train_tokenizer()
    torch.manual_seed(0)
    tiny_llama(vocab=len(tokenizer), layers=LAYERS, tie=True).save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(six_blocks, text_files, tmp_path_factory):
    """The tensors an uninterrupted in-memory run writes."""
    out = tmp_path_factory.mktemp("reference") / "o"
    subprocess.run(_command(six_blocks, out, text_files[0]), check=True, capture_output=True, env=_env())
    return _tensors(out)


@pytest.mark.parametrize("block", [1, 4])
def test_a_killed_streamed_run_resumes_to_the_uninterrupted_result(six_blocks, text_files, uninterrupted, tmp_path,
                                                                   block):
    """SIGKILL `sparsetorch prune --stream` after block `block`'s progress shows; the rerun resumes from its
    checkpoint and writes what an uninterrupted (in-memory) run writes."""
    out = tmp_path / "o"
    command = [*_command(six_blocks, out, text_files[0]), "--stream"]
    assert _run_and_kill(command, "stderr", f"{block}/{LAYERS}", 0.0) == -signal.SIGKILL
    assert not out.exists() and (tmp_path / "o.resume" / "progress.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, env=_env())
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming the interrupted run" in rerun.stdout
    _assert_same(_tensors(out), uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
