"""Gated Linear Attention: a data-dependent decay per key channel from a low-rank projection, and an output gate.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (arXiv 2312.06635), Sec. 4.1:

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t / sqrt(d_k)
    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1/tau)     (tau = 16; in log space logsigmoid(.) / tau)
    y = (RMSNorm_head(o) * swish(x W_r)) W_o

Keys are half as wide as the model (expand_k = 0.5) and values as wide (expand_v = 1), the paper's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.layers.projections import project
from effarch.ops import fused
from effarch.registry import register_mixer


@register_mixer(
    "gla",
    family="linear/attention",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training (arXiv 2312.06635)",
    debug=dict(n_heads=4, gate_low_rank_dim=8),
    recurrent=True,
)
class GLA(LinearMixer):
    """GLA layer: per-key gates alpha = sigmoid(LoRA(x))^(1/16), swish output gate, RMSNorm per head."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        conv_size: int = 0,
        norm_eps: float = 1e-5,
    ):
        key_total, value_total = int(d_model * expand_k), int(d_model * expand_v)
        check_divisible("d_model * expand_k", key_total, "n_heads", n_heads)
        check_divisible("d_model * expand_v", value_total, "n_heads", n_heads)
        if gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer = {gate_logit_normalizer} must be positive")
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=key_total // n_heads,
            value_dim=value_total // n_heads,
            norm="rms",
            gate="silu",
            norm_eps=norm_eps,
        )
        self.gate_logit_normalizer, self.conv_size = gate_logit_normalizer, conv_size
        self.q_proj = nn.Linear(d_model, key_total, bias=False)
        self.k_proj = nn.Linear(d_model, key_total, bias=False)
        self.v_proj = nn.Linear(d_model, value_total, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d_model, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, key_total, bias=True)
        )
        if conv_size:
            for name, channels in (("q", key_total), ("k", key_total), ("v", value_total)):
                self.add_conv(name, channels, conv_size)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        low, gk_out = self.gk_proj
        q, k, v, gk_low, gate = project(x, (self.q_proj, self.k_proj, self.v_proj, low, self.g_proj))
        if self.conv_size:
            q, k, v = ctx.conv("q", q), ctx.conv("k", k), ctx.conv("v", v)
        gk = gk_out(gk_low)
        if fused.enabled(gk.device, gk.dtype):
            log_alpha = fused.log_sigmoid_decay(gk, self.gate_logit_normalizer, backend="triton")
        else:
            log_alpha = F.logsigmoid(upcast(gk)) / self.gate_logit_normalizer
        return Features(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
            log_decay=self.split_heads(log_alpha),
            gate=gate,
        )
