"""HGRN2: a gated linear RNN whose state is expanded by an outer product, the input key tied to 1 - forget gate.

"HGRN2: Gated Linear RNNs with State Expansion" (arXiv 2404.07904), eq. 2 (per head):

    f_t = gamma + (1 - gamma) sigmoid(x_t W_f)        (forget gate per key channel, lower bound gamma)
    S_t = diag(f_t) S_{t-1} + (1 - f_t)^T i_t,   i_t = x_t W_i,   o_t = swish(x_t W_o') S_t
    y = RMSNorm_head(o) W_o

HGRN learns the lower bounds so that they grow with depth. Here gamma is a fixed hyper-parameter: pass
`lower_bound`, or `n_layers` to use gamma_l = l / L (the value HGRN's cumulative-softmax bounds start
from); the default 0 leaves the gate unbounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.registry import register_mixer


@register_mixer(
    "hgrn2",
    family="linear/rnn",
    paper="HGRN2: Gated Linear RNNs with State Expansion (arXiv 2404.07904)",
    debug=dict(expand_ratio=16),
    recurrent=True,
)
class HGRN2(LinearMixer):
    """HGRN2 token mixer: forget gate with lower bound per key channel, key = 1 - f, swish output gate q."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        expand_ratio: int = 128,
        n_heads: int | None = None,
        lower_bound: float | None = None,
        n_layers: int | None = None,
    ):
        if n_heads is None:
            check_divisible("d_model", d_model, "expand_ratio", expand_ratio)
            n_heads = d_model // expand_ratio
        check_divisible("d_model", d_model, "n_heads", n_heads)
        if lower_bound is None:
            lower_bound = layer_idx / n_layers if n_layers else 0.0
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"lower_bound = {lower_bound} must lie in [0, 1)")
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=expand_ratio,
            value_dim=d_model // n_heads,
            scale=1.0,
            norm="rms",
        )
        self.expand_ratio, self.lower_bound, self.n_layers = expand_ratio, lower_bound, n_layers
        self.q_proj = nn.Linear(d_model, n_heads * expand_ratio, bias=False)
        self.f_proj = nn.Linear(d_model, n_heads * expand_ratio, bias=False)
        self.i_proj = nn.Linear(d_model, d_model, bias=False)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        f_logit = upcast(self.split_heads(self.f_proj(x)))
        g = self.lower_bound
        # log f = log(g + (1 - g) sigmoid(z)); 1 - f = (1 - g) sigmoid(-z), both without cancellation.
        log_f = F.logsigmoid(f_logit) if g == 0 else torch.log(g + (1 - g) * torch.sigmoid(f_logit))
        k = ((1 - g) * torch.sigmoid(-f_logit)).to(x.dtype)
        q = F.silu(self.split_heads(self.q_proj(x)))
        return Features(q, k, self.split_heads(self.i_proj(x)), log_decay=log_f)
