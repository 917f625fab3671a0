"""DeltaNet: linear attention whose memory is edited by the delta rule, with short convs and L2-normalised q, k.

"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484). Per head:

    S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,     o_t = K^{-1/2} q_t S_t,

beta_t = sigmoid(x_t w_beta) (times 2 with `allow_neg_eigval`, letting I - beta k^T k have a negative
eigenvalue), q, k, v from projections followed by a short depthwise conv and SiLU, q and k L2-normalised,
the output RMS-normalised per head (optionally gated by SiLU of a projection) and projected back.
Built on `LinearMixer` with rule "delta"; Gated DeltaNet overrides `gates`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.layers.projections import project
from effarch.layers.recompute import recomputed
from effarch.ops import fused
from effarch.ops.grid import cached
from effarch.registry import register_mixer


def _unit_heads(t: torch.Tensor) -> torch.Tensor:
    """Each head's vector scaled to unit L2 norm."""
    return F.normalize(t, dim=-1)


def unit_heads(t: torch.Tensor) -> torch.Tensor:
    """Each head's vector of t [..., D] scaled to unit L2 norm. With the fused kernels on, one RMSNorm pass with
    the constant weight D^-1/2 (x rsqrt(mean x^2 + eps) D^-1/2 = x / sqrt(sum x^2 + D eps), in float32), else
    `F.normalize`, recomputed in backward from the 16-bit input. The two differ only for vectors of norm
    below 1e-12."""
    if fused.enabled(t.device, t.dtype):
        D = t.shape[-1]
        weight = cached(("unit heads", D, str(t.device), t.dtype), lambda: t.new_full((D,), D**-0.5))
        return fused.rms_norm(t, weight, 1e-24 / D, backend="triton")
    return recomputed(_unit_heads, t)


@register_mixer(
    "deltanet",
    family="linear/delta",
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length (arXiv 2406.06484)",
    debug=dict(n_heads=4, conv_size=4),
    recurrent=True,
)
class DeltaNet(LinearMixer):
    """DeltaNet layer: delta-rule memory per head, beta = sigmoid, short convs, L2-normalised q/k, output norm."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-6,
    ):
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        if use_short_conv and conv_size < 1:
            raise ValueError(f"conv_size = {conv_size} must be at least 1")
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=head_dim,
            value_dim=int(head_dim * expand_v),
            rule="delta",
            norm="rms",
            gate="silu" if use_gate else None,
            norm_eps=norm_eps,
        )
        H, K, V = n_heads, self.key_dim, self.value_dim
        self.use_short_conv, self.allow_neg_eigval = use_short_conv, allow_neg_eigval
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.b_proj = nn.Linear(d_model, H, bias=False)
        if use_short_conv:
            for name, channels in (("q", H * K), ("k", H * K), ("v", H * V)):
                self.add_conv(name, channels, conv_size)

    def gate_projections(self) -> tuple[nn.Linear | torch.Tensor, ...]:
        """The projections of x (layers or weights [out, in]) that `gates` reads, in the order it takes their
        outputs."""
        return (self.b_proj,)

    def gates(self, x: torch.Tensor, projected: tuple | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(log_decay [B,T,H] or None, beta [B,T,H]) of the delta rule; `projected`: the outputs of
        `gate_projections` on x when taken already."""
        (b,) = projected if projected is not None else (self.b_proj(x),)
        beta = torch.sigmoid(upcast(b))
        return None, (2 * beta if self.allow_neg_eigval else beta)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        gates = (self.g_proj, *self.gate_projections())
        if self.use_short_conv and ctx.fresh:
            # From a fresh start q, k and v come from one product and pass one short convolution side by side
            # (`Context.joined_convs`): one launch each way for the three, and wider ones.
            joined = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            qkv, gate, *gated = project(x, (joined, *gates))
            q, k, v = ctx.joined_convs(("q", "k", "v"), qkv)
        else:
            q, k, v, gate, *gated = project(x, (self.q_proj, self.k_proj, self.v_proj, *gates))
            if self.use_short_conv:
                q, k, v = ctx.conv("q", q), ctx.conv("k", k), ctx.conv("v", v)
            else:
                q, k, v = F.silu(q), F.silu(k), F.silu(v)
        log_decay, beta = self.gates(x, tuple(gated))
        q, k = unit_heads(self.split_heads(q)), unit_heads(self.split_heads(k))
        return Features(q, k, self.split_heads(v), log_decay=log_decay, beta=beta, gate=gate)

    def flops_per_token(self, seq_len: int) -> float:
        # The chunked delta rule adds the [C, C] triangular solve and the K x V removal to the additive cost.
        return super().flops_per_token(seq_len) + 2.0 * self.n_heads * self.key_dim * self.value_dim
