"""A Llama-family decoder for inference without transformers: the model in one file.

Importing transformers' modeling code costs a decode process ~160 MB of resident memory
(it pulls torch._dynamo, sympy, scipy, accelerate) before a single weight is loaded; this
decoder needs torch alone. Its modules and parameters carry the very names of transformers'
`LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`, `lm_head`, ...), so the loaders fill
it from the same files: `load_lean_model(dir, "dense")` from the dense safetensors,
`load_lean_model(dir, "sparse")` through `load_sparse_model` (SparseLinear layers, no dense copy).

It computes what transformers' Llama computes, in the same order (RMSNorm in fp32, rotary
embeddings of the default type, grouped-query attention, SwiGLU MLP), one forward returning
the last position's logits, with a key/value cache that grows by doubling.

    >>> model, _ = load_lean_model("pruned/smollm2-70", "sparse")
    >>> cache = model.new_cache()
    >>> logits = model(prompt_ids, cache)                     # (1, vocab): the prompt's last position
    >>> logits = model(logits.argmax(-1, keepdim=True), cache)  # one more token
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsetorch.formats.checkpoint import WEIGHTS_FILE
from sparsetorch.runtime.config import RuntimeConfig
from sparsetorch.runtime.loader import assign_weights, load_sparse_model
from sparsetorch.runtime.report import CompileReport
from sparsetorch.runtime.timing import Timer

__all__ = ["LEAN_FAMILIES", "KVCache", "LeanConfig", "LeanLlama", "lean_skeleton", "lean_supports", "load_lean_model"]

# `config.model_type` -> what differs from Llama. Mistral: the same network, but its sliding
# window must not be reached (see LeanConfig.sliding_window). Qwen2: biases on q, k and v.
LEAN_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Llama with a sliding window the sequence must stay within",
    "qwen2": "Llama with q/k/v biases",
}
DEFAULT_ROPE_THETA = 10000.0
VARIANTS = ("dense", "sparse")


@dataclass(frozen=True)
class LeanConfig:
    """The shape of a Llama-family model, read from its `config.json` (`LeanConfig.from_dict`)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # the longest sequence this decoder may run (None: any)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.json: {name} must be at least 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_dict(cls, raw: dict) -> LeanConfig:
        """Read a transformers `config.json` dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`).

        Raises:
            NotImplementedError: a family, activation, rope scaling or sliding window this decoder does not run.
            ValueError: a required field is missing or out of range.
        """
        model_type = raw.get("model_type")
        if model_type not in LEAN_FAMILIES:
            raise NotImplementedError(f"the lean decoder runs model_type {sorted(LEAN_FAMILIES)}, not {model_type!r}; "
                                      "use decoder='transformers' for this model")
        if raw.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"the lean decoder runs hidden_act 'silu', not {raw['hidden_act']!r}")
        try:
            heads = raw["num_attention_heads"]
            shape = dict(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
                         intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"])
        except KeyError as err:
            raise ValueError(f"config.json has no {err.args[0]!r}; is it a causal language model's config?") from None
        return cls(
            model_type=model_type, **shape, num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            **_family_options(model_type, raw),
        )

    @classmethod
    def from_directory(cls, directory: str | Path) -> LeanConfig:
        """`from_dict` of `directory/config.json`.

        Raises:
            FileNotFoundError: no config.json in `directory`.
        """
        path = Path(directory) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; the lean decoder needs a Hugging Face model directory")
        return cls.from_dict(json.loads(path.read_text()))


def _rope_theta(raw: dict) -> float:
    """The rotary base; only the default rope type (no scaling) is implemented."""
    parameters = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"the lean decoder implements rope type 'default', not {rope_type!r} "
                                  "(rope_parameters / rope_scaling in config.json); use decoder='transformers'")
    return float(parameters.get("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA)))


def _family_options(model_type: str, raw: dict) -> dict:
    if model_type == "qwen2":
        if raw.get("use_sliding_window"):
            raise NotImplementedError("the lean decoder has no sliding-window attention (use_sliding_window=true); "
                                      "use decoder='transformers'")
        return {"qkv_bias": True}
    attention = bool(raw.get("attention_bias", False))
    window = raw.get("sliding_window") if model_type == "mistral" else None
    return {"qkv_bias": attention, "o_bias": attention, "mlp_bias": bool(raw.get("mlp_bias", False)),
            "sliding_window": window}


def lean_supports(directory: str | Path) -> bool:
    """Whether the lean decoder runs the model of `directory/config.json` (False without one)."""
    try:
        LeanConfig.from_directory(directory)
    except (NotImplementedError, ValueError, FileNotFoundError):
        return False
    return True


class KVCache:
    """Keys and values of every layer so far, each (B, kv_heads, capacity, head_dim), the first `length`
    positions filled. Grows by doubling, so a decode reallocates a handful of times at most.

    Example:
        >>> cache = model.new_cache(batch=1, capacity=256)
    """

    def __init__(self, config: LeanConfig, batch: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` more positions."""
        needed = self.length + tokens
        if needed <= self.capacity:
            return
        grown = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(*old.shape[:2], grown, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def update(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write one layer's (B, kv_heads, T, head_dim) keys and values after the first `length`
        positions; return all of them so far. `advance` moves `length` once every layer wrote."""
        end = self.length + key.shape[2]
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in fp32 whatever the input's dtype (as transformers does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary:
    """Rotary position embeddings of the default type: cos and sin (T, head_dim) for given positions.
    Not a module and no buffer: the meta-device skeleton must hold nothing a file does not store."""

    def __init__(self, head_dim: int, theta: float) -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
        self.inv_freq = 1.0 / (theta ** exponents)  # (head_dim / 2,)

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # (T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated in pairs (i, i + D/2) by the position's angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LeanConfig, index: int) -> None:
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.index, self.head_dim = index, d
        self.gqa = config.num_key_value_heads != config.num_attention_heads
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, hidden, bias=config.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        batch, tokens, _ = x.shape  # (B, T, C)
        heads = (batch, tokens, -1, self.head_dim)
        q = _rotate(self.q_proj(x).view(heads).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = _rotate(self.k_proj(x).view(heads).transpose(1, 2), cos, sin)  # (B, KV, T, D)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.index, k, v)  # (B, KV, past + T, D)
        out = F.scaled_dot_product_attention(q, k, v, **_causal(tokens, past, x.device),
                                             scale=self.head_dim ** -0.5, enable_gqa=self.gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def _causal(tokens: int, past: int, device: torch.device) -> dict:
    """Position i of T new tokens sees the `past` cached ones and new ones up to itself."""
    if tokens == 1:
        return {}  # one query sees everything cached
    if past == 0:
        return {"is_causal": True}
    rows = torch.arange(tokens, device=device)[:, None] + past
    return {"attn_mask": torch.arange(past + tokens, device=device)[None, :] <= rows}  # (T, past + T)


class MLP(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LeanConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """What transformers calls `LlamaModel`: embeddings, blocks, final norm."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LeanLlama(nn.Module):
    """A Llama-family causal LM for inference: `model(input_ids (B, T), cache) -> logits (B, vocab)` of the
    last position. Build one with `load_lean_model`, or `LeanLlama(config)` for random weights.

    Example:
        >>> model, _ = load_lean_model("pruned/smollm2-70")
        >>> cache = model.new_cache()
        >>> next_token = model(prompt_ids, cache).argmax(-1, keepdim=True)  # (1, 1)
    """

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix where config.json says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        """An empty key/value cache for `batch` sequences (grows past `capacity` as needed)."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch, capacity, weight.dtype, weight.device)

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """Run T new tokens after those in `cache` (which then holds them too; None: no cache).

        Args:
            input_ids: (B, T) token ids.
            cache: from `new_cache`, or None for a single forward over `input_ids` alone.

        Returns:
            (B, vocab) logits of the last position.

        Raises:
            ValueError: the sequence would outgrow the model's sliding window.
        """
        tokens = input_ids.shape[1]
        past = 0 if cache is None else cache.length
        window = self.config.sliding_window
        if window is not None and past + tokens > window:
            raise ValueError(f"{past + tokens} tokens exceed the sliding window ({window}) this lean decoder cannot "
                             "apply; use decoder='transformers' for longer sequences")
        if cache is not None:
            cache.reserve(tokens)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary(torch.arange(past, past + tokens, device=x.device), x.dtype)  # (T, D)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(tokens)
        return self.lm_head(self.model.norm(x[:, -1]))  # (B, vocab)


def lean_skeleton(directory: str | Path) -> LeanLlama:
    """The LeanLlama of `directory/config.json`, every parameter on the meta device (no memory, no values).

    Raises:
        NotImplementedError, ValueError, FileNotFoundError: see `LeanConfig.from_directory`.
    """
    config = LeanConfig.from_directory(directory)
    with torch.device("meta"):
        return LeanLlama(config)


def load_lean_model(directory: str | Path, variant: str = "dense", runtime: RuntimeConfig | None = None,
                    timer: Timer | None = None) -> tuple[LeanLlama, CompileReport | None]:
    """A `sparsetorch prune` output directory (or any Llama-family HF directory, for 'dense') as a LeanLlama.

    Args:
        variant: 'dense': the weights of `directory/model.safetensors`; 'sparse': the compressed weights
            through `load_sparse_model` (SparseLinear layers, never a dense copy of them).
        runtime, timer: as for `load_sparse_model` ('sparse' only).

    Returns:
        (the model in eval mode, the CompileReport of its layers for 'sparse', else None).

    Raises:
        ValueError: an unknown variant.
        NotImplementedError: a model the lean decoder does not run (see `LeanConfig.from_dict`).
        FileNotFoundError: no such weights.

    Example:
        >>> model, report = load_lean_model("pruned/smollm2-70", "sparse")
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    directory = Path(directory)
    if variant == "sparse":
        return load_sparse_model(directory, runtime, timer, skeleton=lean_skeleton)
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; the dense variant needs the model's safetensors weights")
    model = lean_skeleton(directory)
    assign_weights(model, load_file(path), {}, directory)
    return model.eval(), None
