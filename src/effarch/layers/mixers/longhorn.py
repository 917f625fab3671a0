"""Longhorn: a state-space block whose recurrence is the closed-form step of online associative recall.

"Longhorn: State Space Models are Amortized Online Learners" (arXiv 2407.14207). Each step solves

    S_t = argmin_S ||S - S_{t-1}||_F^2 + beta_t ||k_t S - x_t||^2
        = (I - eps_t k_t^T k_t) S_{t-1} + eps_t k_t^T x_t,      eps_t = beta_t / (1 + beta_t ||k_t||^2)

(row convention; the Sherman-Morrison form of the minimiser), read out as y_t = q_t S_t + D x_t. The
forgetting comes from the key itself, with no separate gate. The block is Mamba's: expand-2 input
projection to (x, z), short causal conv + SiLU on x, a projection of x to (beta's low-rank input, k, q),
y * silu(z), output projection (a `LinearMixer` with rule "delta"). We keep the exact rank-1 step (rule "delta" of
`effarch.ops.linear.linear_recurrence` with beta = eps) where the paper's kernel approximates
I - eps k^T k by its diagonal. In the paper beta_t = sigmoid(.) is per channel (head_dim = 1: each
channel of x regresses on the shared key, a head with a [d_state, 1] state); by default one beta is
shared by head_dim = 8 channels (a head regresses an 8-vector on the key, same objective), because the
chunked delta rule pays per head and one-channel heads make it several times slower.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.registry import register_mixer


@register_mixer(
    "longhorn",
    family="linear/delta",
    paper="Longhorn: State Space Models are Amortized Online Learners (arXiv 2407.14207)",
    debug=dict(d_state=4, expand=2, dt_rank=4, head_dim=4),
    recurrent=True,
)
class Longhorn(LinearMixer):
    """Longhorn SSM block: Mamba's layout with the online-regression (delta-rule) state update."""

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
        head_dim: int = 8,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("dt_rank", dt_rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} must be a positive integer")
        d_inner = expand * d_model
        check_divisible("d_inner (expand * d_model)", d_inner, "head_dim", head_dim)
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=d_inner // head_dim,
            key_dim=d_state,
            value_dim=head_dim,
            rule="delta",
            scale=1.0,
            norm=None,
            gate="silu",
            gate_from_x=False,  # the gate is the z half of the input projection
        )
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.add_conv("x", d_inner, d_conv, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.beta_proj = nn.Linear(dt_rank, self.n_heads, bias=True)
        self.D = nn.Parameter(torch.empty(d_inner))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        self.D.fill_(1.0)
        self.beta_proj.bias.zero_()

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        B, T, _ = x.shape
        H, N = self.n_heads, self.d_state
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        xc = ctx.conv("x", xi)
        r, k, q = self.x_proj(xc).split([self.dt_rank, N, N], dim=-1)
        beta = torch.sigmoid(upcast(self.beta_proj(r)))  # [B, T, H]
        eps = beta / (1 + beta * upcast(k).pow(2).sum(-1, keepdim=True))  # the implicit step's effective rate
        return Features(
            q[:, :, None].expand(B, T, H, N),
            k[:, :, None].expand(B, T, H, N),
            self.split_heads(xc),
            beta=eps,
            gate=z,
            extras={"x": xc},
        )

    def finish(self, o: torch.Tensor, f: Features) -> torch.Tensor:
        return o + self.split_heads(self.D * f.extras["x"]).to(o.dtype)  # the D skip, once for both directions

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * self.d_inner * self.d_state
