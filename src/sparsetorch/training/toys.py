"""Small models the demos and the benchmark train: a digits CNN and MLP, and a tiny GPT.

The GPT follows nanoGPT's shape (pre-LayerNorm blocks, GELU MLP of width 4C, causal
scaled-dot-product attention), with separate Linear layers a Sparsifier can target and
an untied `lm_head`, which sparsification leaves dense by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsCNN", "DigitsMLP", "TinyGPT"]


class DigitsCNN(nn.Module):
    """8x8 digits -> 10 classes: two 3x3 convolutions, a pooling, two Linear layers."""

    def __init__(self, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels * 16, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x.view(-1, 1, 8, 8)))  # (B, C, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2C, 4, 4)
        return self.head(F.relu(self.fc(x.flatten(1))))


class DigitsMLP(nn.Module):
    """64 pixels -> 10 classes through two hidden layers."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, time, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A decoder-only transformer over a small vocabulary (characters).

    Args:
        vocab: vocabulary size.
        width: embedding width C.
        layers: number of blocks.
        heads: attention heads (must divide `width`).
        context: longest sequence.
    """

    def __init__(self, vocab: int, width: int = 256, layers: int = 4, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads must divide width, got width={width}, heads={heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale residual projections by depth
            for linear in (block.proj, block.out):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, vocab) logits."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln(x))
