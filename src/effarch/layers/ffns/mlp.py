"""Dense feed-forward blocks: SwiGLU (GLU Variants Improve Transformer, arXiv 2002.05202) and a GELU MLP.

On CUDA the SwiGLU gate silu(W1 x) * W3 x runs as one fused Triton kernel reading both halves of the joint
W1|W3 projection in place, when `effarch.ops.fused.enabled` says so."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.ops import fused
from effarch.registry import register_ffn


def default_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's 8/3 * d rounded up to a multiple, so SwiGLU has about the parameters of a 4d MLP."""
    h = int(8 * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@register_ffn("swiglu", family="dense/ffn", paper="GLU Variants Improve Transformer (arXiv 2002.05202)")
class SwiGLU(nn.Module):
    """y = W2 (silu(W1 x) * W3 x)."""

    def __init__(self, d_model: int, *, hidden: int | None = None, layer_idx: int = 0):
        super().__init__()
        hidden = hidden or default_hidden(d_model)
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ab = self.w13(x)
        if fused.enabled(ab.device, ab.dtype):
            return self.w2(fused.swiglu_packed(ab, backend="triton"))
        a, b = ab.chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


@register_ffn("gelu", family="dense/ffn", paper="Attention Is All You Need (arXiv 1706.03762)")
class GeluMLP(nn.Module):
    """y = W2 gelu(W1 x), hidden 4 d by default."""

    def __init__(self, d_model: int, *, hidden: int | None = None, layer_idx: int = 0):
        super().__init__()
        hidden = hidden or 4 * d_model
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))
