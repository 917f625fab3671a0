"""RetNet multi-scale retention: linear attention with a fixed decay per head, rotary q/k, group norm and swish gate.

"Retentive Network: A Successor to Transformer for Large Language Models" (arXiv 2307.08621), eq. 6-9:

    S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t / sqrt(d_k),   gamma_h = 1 - 2^(-5 - h)
    Y = GroupNorm_h(o),   MSR(X) = (swish(X W_G) * Y) W_O

q and k carry the paper's xPos-style rotation e^{i n theta} (rotary embeddings; the exponential part of
xPos is the decay gamma itself). Values are twice as wide as keys (expand_v = 2), as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer
from effarch.layers.rotary import apply_rotary, rotary_angles
from effarch.registry import register_mixer


def retention_log_decay(n_heads: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """log(1 - 2^(-5 - h)) for h = 0..H-1, [H]: head h forgets over roughly 2^(5+h) tokens."""
    h = torch.arange(n_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.exp2(-5.0 - h)).to(dtype)


@register_mixer(
    "retnet",
    family="linear/attention",
    paper="Retentive Network: A Successor to Transformer for Large Language Models (arXiv 2307.08621)",
    debug=dict(n_heads=4),
    recurrent=True,
)
class RetNet(LinearMixer):
    """Multi-scale retention: per-head decays 1 - 2^(-5-h), rotary q/k, GroupNorm, swish output gate."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 8,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        rotary: bool = True,
        rope_base: float = 10000.0,
    ):
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        value_dim = int(head_dim * expand_v)
        if rotary and head_dim % 2:
            raise ValueError(f"head_dim = {head_dim} must be even for rotary q/k")
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=head_dim,
            value_dim=value_dim,
            norm="group",
            gate="silu",
        )
        self.rotary, self.rope_base = rotary, rope_base
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads * value_dim, bias=False)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        q, k = self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x))
        if self.rotary:
            cos, sin = rotary_angles(ctx.positions(x.shape[1], x.device), self.key_dim, self.rope_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        log_decay = retention_log_decay(self.n_heads, x.dtype, x.device)
        return Features(q, k, self.split_heads(self.v_proj(x)), log_decay=log_decay)
