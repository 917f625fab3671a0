"""Linear attention with a feature map (Katharopoulos et al.) and Based (Taylor feature map + short conv).

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (arXiv 2006.16236), eq. 5:

    o_t = phi(q_t) S_t / (phi(q_t) z_t),   S_t = S_{t-1} + phi(k_t)^T v_t,   z_t = z_{t-1} + phi(k_t)^T

The normaliser z rides along as a column of ones appended to v, so S is [K, V+1] and one recurrence gives
numerator and denominator. Based ("Simple linear attention language models balance the recall-throughput
tradeoff", arXiv 2402.18668) projects q, k to a small feature_dim, applies the 2nd-order Taylor map
(phi(q).phi(k) = 1 + s + s^2/2, s = q.k / sqrt(feature_dim)), skips the denominator and normalises the
output instead, with a short convolution on the input.
"""

from __future__ import annotations

import torch
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.feature_maps import feature_dim as mapped_dim
from effarch.layers.feature_maps import get_feature_map
from effarch.layers.linear_mixer import Context, Features, LinearMixer
from effarch.registry import register_mixer


@register_mixer(
    "linear_attn",
    family="linear/attention",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (arXiv 2006.16236)",
    debug=dict(n_heads=4),
    recurrent=True,
)
class LinearAttention(LinearMixer):
    """phi(q) S / phi(q) z with phi in {identity, elu, relu, taylor}; optional output norm and gate."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 8,
        head_dim: int | None = None,
        feature_dim: int | None = None,
        feature_map: str = "elu",
        normalize: bool = True,
        norm: str | None = None,
        gate: str | None = None,
        conv_size: int = 0,
        eps: float = 1e-6,
    ):
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        feature_dim = feature_dim or head_dim
        phi = get_feature_map(feature_map)
        K = mapped_dim(feature_map, feature_dim)
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=K,
            value_dim=head_dim,
            state_value_dim=head_dim + 1 if normalize else head_dim,
            scale=1.0 if normalize else K**-0.5,  # the ratio cancels any scale
            norm=norm,
            gate=gate,
        )
        if conv_size < 0:
            raise ValueError(f"conv_size = {conv_size} must be 0 (no short convolution) or a kernel width")
        self.phi, self.feature_map, self.feature_dim = phi, feature_map, feature_dim
        self.normalize, self.eps = normalize, eps
        # The Taylor map approximates exp(q.k / sqrt(d)): scale q and k by d^(-1/4) each before mapping.
        self.input_scale = feature_dim**-0.25 if feature_map == "taylor" else 1.0
        self.q_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.conv_size = conv_size
        if conv_size:
            self.add_conv("x", d_model, conv_size)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        h = ctx.conv("x", x) if self.conv_size else x
        q = self.phi(self.split_heads(self.q_proj(h)) * self.input_scale)
        k = self.phi(self.split_heads(self.k_proj(h)) * self.input_scale)
        v = self.split_heads(self.v_proj(h))
        if self.normalize:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # the last column accumulates z
        return Features(q, k, v)

    def finish(self, o: torch.Tensor, f: Features) -> torch.Tensor:
        if not self.normalize:
            return o
        return o[..., :-1] / (o[..., -1:] + self.eps)


@register_mixer(
    "based",
    family="linear/attention",
    paper="Simple linear attention language models balance the recall-throughput tradeoff (arXiv 2402.18668)",
    debug=dict(n_heads=4, feature_dim=4),
    recurrent=True,
)
class Based(LinearAttention):
    """Based's linear attention: Taylor map on 16-dim q, k, short conv, no denominator, RMS output norm."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 8,
        head_dim: int | None = None,
        feature_dim: int = 16,
        conv_size: int = 4,
        normalize: bool = False,
        norm: str | None = "rms",
    ):
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            head_dim=head_dim,
            feature_dim=feature_dim,
            feature_map="taylor",
            normalize=normalize,
            norm=norm,
            conv_size=conv_size,
        )
