"""Lightning Attention (TransNormerLLM): linear attention with a fixed per-head decay, SRMSNorm and an output gate.

"TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer" (arXiv 2307.14995),
computed as in "Lightning Attention-2" (arXiv 2401.04658):

    q = swish(x W_q), k = swish(x W_k), v = x W_v, u = swish(x W_u)
    S_t = lambda_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t,   y = (SRMSNorm(o) * u) W_o

with lambda_h = exp(-s_h (1 - l / (L - 1))), s_h = 2^(-8 (h + 1) / H) the ALiBi slopes, l the layer index
and L the number of layers (pass `n_layers`; without it every layer uses the bottom layer's decays).
SRMSNorm is x / RMS(x) over all channels, without weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer
from effarch.registry import register_mixer


def lightning_log_decay(
    n_heads: int, layer_idx: int = 0, n_layers: int | None = None, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """log lambda_h = -s_h (1 - l/(L-1) + 1e-5), [H]; deeper layers decay less (the top layer barely)."""
    slopes = torch.exp2(-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64, device=device) / n_heads)
    depth = 1.0 if not n_layers or n_layers < 2 else 1.0 - layer_idx / (n_layers - 1) + 1e-5
    return (-slopes * depth).to(dtype)


@register_mixer(
    "lightning",
    family="linear/attention",
    paper="TransNormerLLM (arXiv 2307.14995); Lightning Attention-2 (arXiv 2401.04658)",
    debug=dict(n_heads=4),
    recurrent=True,
)
class Lightning(LinearMixer):
    """TransNormerLLM token mixer: swish q/k, fixed ALiBi-slope decays per head, SRMSNorm, swish gate."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 8,
        head_dim: int | None = None,
        n_layers: int | None = None,
    ):
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        if n_layers is not None and (n_layers < 1 or layer_idx >= n_layers):
            raise ValueError(f"n_layers = {n_layers} must be positive and larger than layer_idx = {layer_idx}")
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=head_dim,
            value_dim=head_dim,
            scale=1.0,  # SRMSNorm follows, so the output scale does not matter
            norm="srms",
            gate="silu",
        )
        self.n_layers = n_layers
        self.qkv_proj = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        q, k, v = self.split_heads(self.qkv_proj(x), 3 * self.key_dim).chunk(3, dim=-1)
        log_decay = lightning_log_decay(self.n_heads, self.layer_idx, self.n_layers, x.dtype, x.device)
        return Features(F.silu(q), F.silu(k), v, log_decay=log_decay)
