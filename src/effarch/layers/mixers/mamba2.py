"""Mamba-2 (SSD): a selective SSM whose transition is a scalar per head, i.e. linear attention with a scalar decay.

"Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality" (arXiv 2405.21060), Sec. 7 (the Mamba-2 block). Per head h (P = head_dim channels, N = d_state):

    [z, x, B, C, dt] = u W_in;   x, B, C = silu(conv1d(x, B, C));   dt = softplus(dt + dt_bias)
    h_t = exp(dt_t a_h) h_{t-1} + B_t^T (dt_t x_t),   y_t = C_t h_t + D_h x_t,   a_h = -exp(A_log_h)
    out = RMSNorm(y * silu(z)) W_out                 (normalised in n_groups groups of channels)

As a linear recurrence: q = C, k = B (shared by the heads of a group), v = dt x, log decay dt a [B,T,H],
scale 1. State: h [N,H,d_state,head_dim] and the conv tail over (x, B, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.layers.recompute import recomputed
from effarch.ops import fused
from effarch.registry import register_mixer

# The step size, log decay and step-scaled values as one fused kernel each way where the fused kernels run (False:
# the PyTorch form; for side-by-side timing, e.g. `train_throughput.py --set
# effarch.layers.mixers.mamba2.FUSED_INPUTS=False`).
FUSED_INPUTS = True


@register_mixer(
    "mamba2",
    family="linear/ssm",
    paper="Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space "
    "Duality (arXiv 2405.21060)",
    debug=dict(d_state=8, head_dim=16, n_groups=2),
    recurrent=True,
)
class Mamba2(LinearMixer):
    """Mamba-2 block: in_proj, short conv over (x, B, C), SSD with scalar per-head decay, D skip, gated RMSNorm."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
    ):
        d_inner = expand * d_model
        check_divisible("expand * d_model", d_inner, "head_dim", head_dim)
        H = d_inner // head_dim
        check_divisible("n_heads (expand * d_model / head_dim)", H, "n_groups", n_groups)
        if d_conv < 1 or d_state < 1:
            raise ValueError(f"d_conv = {d_conv} and d_state = {d_state} must be positive")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min = {dt_min} and dt_max = {dt_max} must satisfy 0 < dt_min <= dt_max")
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=H,
            key_dim=d_state,
            value_dim=head_dim,
            scale=1.0,
            norm=None,
        )
        self.d_inner, self.d_state, self.n_groups, self.norm_eps = d_inner, d_state, n_groups, norm_eps
        self.A_init_range, self.dt_range, self.dt_init_floor = A_init_range, (dt_min, dt_max), dt_init_floor
        conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + conv_dim + H, bias=False)
        self.add_conv("xBC", conv_dim, d_conv, bias=True)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """A uniform in A_init_range; dt_bias so that softplus(dt_bias) is log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.A_init_range).log())
        lo, hi = (math.log(v) for v in self.dt_range)
        dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp_min(self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        G, N, H = self.n_groups, self.d_state, self.n_heads
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * G * N, H], dim=-1)
        xs, Bm, Cm = ctx.conv("xBC", xBC, splits=(self.d_inner, G * N, G * N))
        xs = self.split_heads(xs)  # [B,T,H,P]
        # Each group's B and C serve H / G consecutive heads: passed as key groups [B,T,G,N], so the backward
        # keeps G copies, not H (they were a quarter of Mamba2's saved activations).
        Bm, Cm = Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (G, N))
        if FUSED_INPUTS and fused.enabled(xs.device, xs.dtype):  # the step, decay and values in one pass each way
            log_decay, v = fused.ssd_inputs(dt, xs, self.A_log, self.dt_bias, backend="triton")
        else:
            log_decay, v = fused.ssd_inputs_reference(dt, xs, self.A_log, self.dt_bias)  # [B,T,H], [B,T,H,P]
        return Features(Cm, Bm, v, log_decay=log_decay, gate=z, extras={"x": xs})

    def finish(self, o: torch.Tensor, f: Features) -> torch.Tensor:
        return o + self.D[:, None].to(o.dtype) * f.extras["x"]

    def output(self, o: torch.Tensor, f: Features, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y * silu(z)) over groups of d_inner / n_groups channels, then the out projection; one fused
        kernel on CUDA when the channels form one group."""
        if self.n_groups == 1 and fused.gated_norm_enabled(o.device, o.dtype):
            B, T = o.shape[:2]
            y = fused.gated_rms_norm(
                o.reshape(B, T, -1), self.norm_weight, f.gate, self.norm_eps, gate_first=True, backend="triton"
            )
            return self.o_proj(y.to(x.dtype))
        return self.o_proj(recomputed(self._gated_norm, o, f.gate).to(x.dtype))

    def _gated_norm(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        y = upcast(o.reshape(B, T, self.n_groups, -1)) * F.silu(upcast(gate.reshape(B, T, self.n_groups, -1)))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return y.flatten(-2) * self.norm_weight.to(y.dtype)
