"""Gated DeltaNet: the delta rule with a Mamba-2-style scalar forget gate per head.

"Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464). Per head:

    S_t = a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = K^{-1/2} q_t S_t,
    log a_t = g_t = -exp(A_log) * softplus(x_t w_a + dt_bias),      beta_t = sigmoid(x_t w_beta),

with DeltaNet's short convs and L2-normalised q, k, and a gated RMSNorm on the output (SiLU gate).
Same features and forward as `DeltaNet` (a `LinearMixer`); only the gates differ. A is drawn from U(0, 16) and softplus(dt_bias)
from [1e-3, 1e-1] log-uniformly, as for Mamba-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.mixers.deltanet import DeltaNet
from effarch.layers.mixers.mamba import inverse_softplus
from effarch.ops import fused
from effarch.registry import register_mixer


@register_mixer(
    "gated_deltanet",
    family="linear/delta",
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule (arXiv 2412.06464)",
    debug=dict(n_heads=4, expand_v=2.0),
    recurrent=True,
)
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer: DeltaNet plus a data-dependent scalar decay and a gated output norm."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = True,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-6,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            head_dim=head_dim,
            expand_v=expand_v,
            use_short_conv=use_short_conv,
            conv_size=conv_size,
            use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval,
            norm_eps=norm_eps,
        )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min = {dt_min} and dt_max = {dt_max} must satisfy 0 < dt_min <= dt_max")
        self.dt_min, self.dt_max = dt_min, dt_max
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
        u = torch.rand_like(self.dt_bias)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        self.dt_bias.copy_(inverse_softplus(dt.clamp_min(1e-4)))

    def gate_projections(self) -> tuple[torch.Tensor, ...]:
        # a and b from one product: two H-wide products each reread all of x, forward and backward
        return (torch.cat([self.a_proj.weight, self.b_proj.weight]),)

    def gates(self, x: torch.Tensor, projected: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        (ab,) = projected if projected is not None else (F.linear(x, *self.gate_projections()),)
        scale = 2.0 if self.allow_neg_eigval else 1.0
        if fused.enabled(ab.device, ab.dtype):  # one launch each way instead of about ten
            return fused.delta_gates(ab, self.A_log, self.dt_bias, scale, backend="triton")
        return fused.delta_gates_reference(ab, self.A_log, self.dt_bias, scale)
