"""Mamba (S6) block: input projection, short causal convolution, selective scan with a gate, output projection.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), Fig. 3 / Sec. 3.4.
Per channel d of the expanded stream (d_inner = expand * d_model) and state n:

    h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d],   y_t = C_t h_t + D x_t,

dt_t = softplus(W_dt (W_x x_t)[:dt_rank] + dt_bias), B_t, C_t = the rest of W_x x_t, A = -exp(A_log),
output y_t * silu(z_t) projected back. The state is the conv tail [B, d_conv-1, d_inner] and the SSM
state [B, d_inner, d_state] (float32). Bidirectional mode runs the conv and scan over the sequence and
over its reverse and adds the two (as Vision Mamba does, with shared weights here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effarch.cache import RecurrentState
from effarch.layers.base import TokenMixer
from effarch.layers.conv import ShortConvolution
from effarch.layers.linear_mixer import flip_time
from effarch.ops.scan import selective_scan
from effarch.registry import register_mixer


def state_bytes(dtype: torch.dtype, *counts_in_dtype: int, matrix: int = 0) -> int:
    """Bytes of a state holding `counts_in_dtype` values in `dtype` plus `matrix` recurrent-matrix values,
    which are float32 (float64 when the model runs in float64)."""
    esize = torch.tensor([], dtype=dtype).element_size()
    return esize * sum(counts_in_dtype) + (8 if dtype == torch.float64 else 4) * matrix


def check_state_args(causal: bool, state, cu_seqlens) -> None:
    """The same call contract as `LinearMixer`: no state in bidirectional mode, not both state and packing."""
    if state is not None and not causal:
        raise ValueError("a bidirectional (causal=False) mixer sees the whole sequence and takes no state")
    if state is not None and cu_seqlens is not None:
        raise ValueError("pass either a carried state or cu_seqlens (packed documents start fresh), not both")


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


@register_mixer(
    "mamba",
    family="linear/ssm",
    paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces (arXiv 2312.00752)",
    debug=dict(d_state=4, expand=2, dt_rank=4, d_conv=4),
    recurrent=True,
)
class Mamba(TokenMixer):
    """Mamba-1 selective SSM block with expand-2 gating, depthwise causal conv and a D skip."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("dt_rank", dt_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name} = {value!r} must be a positive integer" + (" or 'auto'" if name == "dt_rank" else "")
                )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min = {dt_min} and dt_max = {dt_max} must satisfy 0 < dt_min <= dt_max")
        self.d_state, self.d_conv, self.expand, self.dt_rank = d_state, d_conv, expand, dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.d_inner = d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv = ShortConvolution(d_inner, d_conv, bias=conv_bias, activation="silu")
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The paper's S4D-real A (A = -(1..N) per channel), D = 1, and dt with softplus(dt_bias) in [dt_min, dt_max]."""
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        u = torch.rand(self.d_inner, device=self.dt_proj.bias.device)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        self.dt_proj.bias.copy_(inverse_softplus(dt.clamp_min(self.dt_init_floor)))

    def _scan(self, xi, state, cu_seqlens):
        """Conv, projections and scan of one direction; returns (y before the z gate, conv tail, SSM state)."""
        xc, tail = self.conv(xi, None if state is None else state["conv"], cu_seqlens=cu_seqlens)
        dt, Bm, Cm = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y, h = selective_scan(
            xc,
            F.linear(dt, self.dt_proj.weight),
            -torch.exp(self.A_log),
            Bm,
            Cm,
            self.D,
            dt_bias=self.dt_proj.bias,
            dt_softplus=True,
            initial_state=None if state is None else state["ssm"],
            output_final_state=True,
            cu_seqlens=cu_seqlens,
        )
        return y, tail, h

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, *, cu_seqlens: torch.Tensor | None = None):
        check_state_args(self.causal, state, cu_seqlens)
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        if self.causal:
            y, tail, h = self._scan(xi, state, cu_seqlens)
            new_state = RecurrentState(conv=tail, ssm=h, seq_len=(0 if state is None else state.seq_len) + x.shape[1])
        else:
            y, _, _ = self._scan(xi, None, cu_seqlens)
            xr, cu_r = flip_time(xi, cu_seqlens)
            y = y + self._scan(xr, None, cu_r)[0].flip(1)
            new_state = None
        return self.out_proj(y * F.silu(z)), new_state

    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        return state_bytes(dtype, batch * (self.d_conv - 1) * self.d_inner, matrix=batch * self.d_inner * self.d_state)

    def flops_per_token(self, seq_len: int) -> float:
        return 9.0 * self.d_inner * self.d_state  # discretise, update and read the state per channel
