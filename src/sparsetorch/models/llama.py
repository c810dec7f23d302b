"""sparsetorch's own Llama-family model: Llama, Mistral (within its sliding window) and Qwen2, in one file.

It serves both halves of the pipeline. One-shot pruning calibrates these families block by block
through it (`LeanLlama.sharing` builds it over the very parameters of a transformers model, so
pruning it prunes that model), and `runtime` and `bench` run pruned models in it. It needs torch
alone: importing transformers' modeling code costs a decode process tens of megabytes before a
single weight is loaded. Its modules and parameters carry the names of transformers'
`LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`, `lm_head`, ...), so the same files and the
same target names fit both.

It computes what transformers' Llama computes, in the same order (RMSNorm in fp32, rotary
embeddings of the default type, grouped-query attention, SwiGLU MLP), through the fused ops of
`models/ops.py` (one pass per elementwise step, causal attention over the visible keys only) and,
for calibration, linears on weights packed once (`models/packed.py`). One forward returns the last
position's logits, with a key/value cache that grows by doubling.

    >>> model = load_lean_model("pruned/smollm2-70", "sparse")[0]   # sparsetorch.runtime
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

from sparsetorch.families import FAMILIES, LLAMA_LIKE, Family
from sparsetorch.models import ops
from sparsetorch.models.ops import STEP_TOKENS, causal_attention, fused_add_rms_norm, rms_norm, rotary, silu_mul, silu_mul_halves
from sparsetorch.models.packed import PackedLinear, PackedWeights
from sparsetorch.models.step import DecodePlan
from sparsetorch.precision import plain_fp32_cpu

__all__ = ["KVCache", "LeanConfig", "LeanLlama", "own_families"]

DEFAULT_ROPE_THETA = 10000.0


def own_families() -> list[str]:
    """The `config.model_type`s this model implements (from `families.FAMILIES`)."""
    return sorted(name for name, family in FAMILIES.items() if family.own_model == LLAMA_LIKE)


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
        family = FAMILIES.get(model_type)
        if family is None or family.own_model != LLAMA_LIKE:
            raise NotImplementedError(f"the lean decoder runs model_type {own_families()}, not {model_type!r}; "
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
            **_family_options(family, raw),
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


def _family_options(family: Family, raw: dict) -> dict:
    """Biases and sliding window, as the family's row in `families.FAMILIES` says to read them."""
    for flag in family.refused_flags:
        if raw.get(flag):
            raise NotImplementedError(f"the lean decoder does not compute {flag}=true (config.json); "
                                      "use decoder='transformers'")
    attention = bool(raw.get("attention_bias", False))
    return {"qkv_bias": attention if family.qkv_bias is None else family.qkv_bias, "o_bias": attention,
            "mlp_bias": bool(raw.get("mlp_bias", False)),
            "sliding_window": raw.get(family.window_key) if family.window_key else None}


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
        self.plan: DecodePlan | bool | None = None  # the model's decode plan for this cache (`models.step`)

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
        return rms_norm(x, self.weight, self.eps)


def add_rms_norm(x: Tensor, update: Tensor, norm: RMSNorm) -> Tensor:
    """x += update (in place: x is the residual stream), then `norm(x)`."""
    return fused_add_rms_norm(x, update, norm.weight, norm.eps)


class Rotary:
    """Rotary position embeddings of the default type: cos and sin (1, T, head_dim) for given positions.
    Not a module and no buffer: the meta-device skeleton must hold nothing a file does not store."""

    def __init__(self, head_dim: int, theta: float) -> None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
        self.inv_freq = 1.0 / (theta ** exponents)  # (head_dim / 2,)

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # (T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)[None]  # (1, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Grouped-query attention. `runtime.fuse_projections` may replace q_proj, k_proj and v_proj by one
    `qkv_proj` (their rows stacked): one matmul instead of three, and a decode step's attention in one op."""

    def __init__(self, config: LeanConfig, index: int, packed: PackedWeights | None = None) -> None:
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.index, self.head_dim, self.heads = index, d, config.num_attention_heads
        self.widths = (config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d)
        self.gqa = config.num_key_value_heads != config.num_attention_heads
        self.q_proj = PackedLinear(hidden, config.num_attention_heads * d, config.qkv_bias, packed)
        self.k_proj = PackedLinear(hidden, config.num_key_value_heads * d, config.qkv_bias, packed)
        self.v_proj = PackedLinear(hidden, config.num_key_value_heads * d, config.qkv_bias, packed)
        self.o_proj = PackedLinear(config.num_attention_heads * d, hidden, config.o_bias, packed)
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        batch, tokens, _ = x.shape  # (B, T, C)
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.widths, dim=-1)
        heads = (batch, tokens, -1, self.head_dim)
        q, k, v = (t.reshape(heads).transpose(1, 2) for t in (q, k, v))  # (B, H or KV, T, D)
        q, k = rotary(q, k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.index, k, v)  # (B, KV, past + T, D)
        scale = self.head_dim ** -0.5
        if past == 0:  # nothing cached before these tokens: plain causal attention
            out = causal_attention(q, k, v, scale)  # (B, T, H, D)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **_after_cache(tokens, past, x.device), scale=scale,
                                                 enable_gqa=self.gqa).transpose(1, 2)
        return self.o_proj(out.reshape(batch, tokens, -1))


def _after_cache(tokens: int, past: int, device: torch.device) -> dict:
    """Position i of T new tokens sees the `past` cached ones and new ones up to itself."""
    if tokens == 1:
        return {}  # one query sees everything cached
    rows = torch.arange(tokens, device=device)[:, None] + past
    return {"attn_mask": torch.arange(past + tokens, device=device)[None, :] <= rows}  # (T, past + T)


class MLP(nn.Module):
    """The SiLU-gated MLP. `runtime.fuse_projections` may replace gate_proj and up_proj by one `gate_up_proj`."""

    def __init__(self, config: LeanConfig, packed: PackedWeights | None = None) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = PackedLinear(hidden, inner, config.mlp_bias, packed)
        self.up_proj = PackedLinear(hidden, inner, config.mlp_bias, packed)
        self.down_proj = PackedLinear(inner, hidden, config.mlp_bias, packed)
        self.gate_up_proj: nn.Module | None = None

    def gated(self, x: Tensor) -> Tensor:
        """silu(gate_proj(x)) * up_proj(x), down_proj's input."""
        if self.gate_up_proj is not None:
            return silu_mul_halves(self.gate_up_proj(x))
        return silu_mul(self.gate_proj(x), self.up_proj(x))  # gate and up freed before down_proj runs

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gated(x))


class Block(nn.Module):
    def __init__(self, config: LeanConfig, index: int, packed: PackedWeights | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, index, packed)
        self.mlp = MLP(config, packed)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """What transformers calls `LlamaModel`: embeddings, blocks, final norm."""

    def __init__(self, config: LeanConfig, packed: PackedWeights | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, packed) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LeanLlama(nn.Module):
    """A Llama-family causal LM: `model(input_ids (B, T), cache) -> logits (B, vocab)` of the last
    position. Build one with `runtime.load_lean_model`, over a transformers model's parameters with
    `LeanLlama.sharing`, or `LeanLlama(config)` for random weights.

    Args:
        config: the model's shape.
        packed: a cache of packed weights for the linears (calibration); None multiplies as nn.Linear.

    Example:
        >>> model, _ = load_lean_model("pruned/smollm2-70")
        >>> cache = model.new_cache()
        >>> next_token = model(prompt_ids, cache).argmax(-1, keepdim=True)  # (1, 1)
    """

    def __init__(self, config: LeanConfig, packed: PackedWeights | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config, packed)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.tie_weights()

    @classmethod
    def sharing(cls, model: nn.Module, packed: PackedWeights | None = None) -> LeanLlama | None:
        """This model over the very parameters of a transformers Llama-family `model` (writes to one
        are writes to the other), or None where `model` is not one this implementation computes.

        Example:
            >>> ours = LeanLlama.sharing(hf_model, PackedWeights())
            >>> ours.model.layers[0].mlp.down_proj.weight is hf_model.model.layers[0].mlp.down_proj.weight
            True
        """
        config = getattr(model, "config", None)
        if not hasattr(config, "to_dict") or (getattr(config, "attention_dropout", 0.0) and model.training):
            return None
        try:
            shape = LeanConfig.from_dict(config.to_dict())
        except (NotImplementedError, ValueError, KeyError, TypeError):
            return None
        with torch.device("meta"):
            ours = cls(shape, packed)
        parameters = dict(model.named_parameters())  # tied ones once
        if set(parameters) - {name for name, _ in ours.named_parameters(remove_duplicate=False)}:
            return None  # something this implementation does not compute
        ours.load_state_dict(parameters, strict=False, assign=True)
        ours.tie_weights()
        if any(p.is_meta for p in ours.parameters()):
            return None
        return ours.train(model.training)

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix where config.json says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (transformers' name for it, so code that finds embeddings finds ours)."""
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        """The output projection to the vocabulary (transformers' name for it)."""
        return self.lm_head

    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        """An empty key/value cache for `batch` sequences (grows past `capacity` as needed)."""
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch, capacity, weight.dtype, weight.device)

    def positions(self, past: int, tokens: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin (1, T, head_dim) of positions past .. past + tokens, in `like`'s dtype and device."""
        return self.rotary(torch.arange(past, past + tokens, device=like.device), like.dtype)

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
        self.check_length(past + tokens)
        if cache is not None:
            cache.reserve(tokens)
        x = self.model.embed_tokens(input_ids)  # (B, T, C), the residual stream, added to in place
        cos, sin = self.positions(past, tokens, x)  # (1, T, D)
        plan = self._step_plan(x, cache) if cache is not None and tokens <= STEP_TOKENS else None
        if plan is not None:  # a few tokens after a cache: the bound calls of `models.step`
            rows = x.view(-1, x.shape[-1])
            h = plan.run(rows, cos, sin, cache.keys, cache.values, past).view(x.shape)
        else:
            h = self._layers(x, cos, sin, cache)
        if cache is not None:
            cache.advance(tokens)
        return self.lm_head(h[:, -1])  # (B, vocab)

    def _layers(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        """Every block on the residual stream x (added to in place); returns the final norm of it."""
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        for i, block in enumerate(layers):  # Block.forward's arithmetic, each residual add fused with the next norm
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h = add_rms_norm(x, block.self_attn(h, cos, sin, cache), block.post_attention_layernorm)
            h = add_rms_norm(x, block.mlp(h), following)
        return h

    def _step_plan(self, x: Tensor, cache: KVCache) -> DecodePlan | None:
        """The cache's decode plan, made at its first step; None where the step ops cannot run it (no
        compiler, or not fp32 on the CPU): then the general path serves."""
        if cache.plan is None:
            kernels = ops.decode_ops()
            usable = kernels is not None and plain_fp32_cpu(x, cache.keys[0], self.model.norm.weight)
            cache.plan = DecodePlan(self, x, kernels) if usable else False
        return cache.plan or None

    def check_length(self, tokens: int) -> None:
        """Raise ValueError if a sequence of `tokens` would outgrow the sliding window this model cannot apply."""
        window = self.config.sliding_window
        if window is not None and tokens > window:
            raise ValueError(f"{tokens} tokens exceed the sliding window ({window}) this lean decoder cannot "
                             "apply; use decoder='transformers' for longer sequences")

