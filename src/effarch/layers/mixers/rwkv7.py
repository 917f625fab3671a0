"""RWKV-7 "Goose" time mixing: token shift, vector decay, removal key and in-context learning rate.

"RWKV-7 "Goose" with Expressive Dynamic State Evolution" (arXiv 2503.14456), Sec. 4. With the token
shift lerp(x_t, x_{t-1}, mu) feeding each branch:

    k_t = x^k W_k,  kappa_hat_t = normalize(k_t * xi)  (removal key),  a_t = sigmoid(a0 + x^a A_a B_a)
    k~_t = k_t * lerp(1, a_t, alpha)  (replacement key),  w_t = exp(-e^{-1/2} sigmoid(w0 + tanh(x^w A_w) B_w))
    wkv_t = wkv_{t-1} (diag(w_t) - kappa_hat_t^T (a_t * kappa_hat_t)) + v_t^T k~_t     (column form)
    p_t = GroupNorm(r_t wkv_t^T) + ((r_t * rho * k~_t) summed per head) v_t,   o_t = (g_t * p_t) W_o

run on `effarch.ops.linear.generalized_delta_rule` with a = -kappa_hat, b = kappa_hat * a_t, scale 1,
inside the `LinearMixer` skeleton (its `recurrence` and `output` hooks overridden). Departure: the
value residual (v mixed with the first layer's value) is left out, because a mixer here does not see
other layers. State: the previous token "shift" [B, d_model] and wkv "S" [B, H, K, K] (float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.ops.linear.generalized_delta import BACKENDS, generalized_delta_rule
from effarch.registry import register_mixer


def _lora_dim(d_model: int, factor: float, power: float) -> int:
    """The paper's low-rank sizes: max(32, round(factor * C^power / 32) * 32)."""
    return max(32, round(factor * d_model**power / 32) * 32)


@register_mixer(
    "rwkv7",
    family="linear/delta",
    paper='RWKV-7 "Goose" with Expressive Dynamic State Evolution (arXiv 2503.14456)',
    debug=dict(head_dim=16, decay_low_rank_dim=8, a_low_rank_dim=8, gate_low_rank_dim=8),
    recurrent=True,
)
class RWKV7(LinearMixer):
    """RWKV-7 time mixing on the generalised delta rule (vector decay + rank-1 in-context update)."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        head_dim: int = 64,
        decay_low_rank_dim: int | None = None,
        a_low_rank_dim: int | None = None,
        gate_low_rank_dim: int | None = None,
    ):
        check_divisible("d_model", d_model, "head_dim", head_dim)
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=d_model // head_dim,
            key_dim=head_dim,
            value_dim=head_dim,
            scale=1.0,
            norm="group",
            gate=None,  # RWKV-7's gate is a low-rank MLP applied in `output`
            norm_eps=head_dim * 1e-5,
        )
        C, H = d_model, self.n_heads
        d_w = decay_low_rank_dim or _lora_dim(C, 1.8, 0.5)
        d_a = a_low_rank_dim or _lora_dim(C, 1.8, 0.5)
        d_g = gate_low_rank_dim or _lora_dim(C, 0.6, 0.8)
        self.add_token_shift()
        self.mu = nn.Parameter(torch.empty(6, C))  # token-shift mix for r, w, k, v, a, g
        self.r_proj, self.k_proj, self.v_proj = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.w0, self.w1, self.w2 = (
            nn.Parameter(torch.empty(C)),
            nn.Parameter(torch.empty(C, d_w)),
            nn.Parameter(torch.empty(d_w, C)),
        )
        self.a0, self.a1, self.a2 = (
            nn.Parameter(torch.empty(C)),
            nn.Parameter(torch.empty(C, d_a)),
            nn.Parameter(torch.empty(d_a, C)),
        )
        self.g1, self.g2 = nn.Parameter(torch.empty(C, d_g)), nn.Parameter(torch.empty(d_g, C))
        self.k_k = nn.Parameter(torch.empty(C))  # xi: removal-key scale
        self.k_a = nn.Parameter(torch.empty(C))  # alpha: how much a_t scales the replacement key
        self.r_k = nn.Parameter(torch.empty(H, head_dim))  # rho: bonus for the current token
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Follows the paper's release: slow-to-fast decays over channels, zero LoRA down-projections."""
        C = self.d_model
        ddd = torch.arange(C, dtype=torch.float32, device=self.mu.device) / C
        self.mu.copy_(torch.stack([1 - ddd**p for p in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)]))
        n = torch.arange(C, dtype=torch.float32, device=self.w0.device) / max(C - 1, 1)
        self.w0.copy_(-7 + 5 * n**0.85 + 0.5)
        self.a0.zero_()
        self.k_k.fill_(0.85)
        self.k_a.fill_(1.0)
        self.r_k.zero_()
        for down, up in ((self.w1, self.w2), (self.a1, self.a2), (self.g1, self.g2)):
            down.zero_()
            nn.init.uniform_(up, -0.1 / math.sqrt(up.shape[0]), 0.1 / math.sqrt(up.shape[0]))

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        prev = ctx.shift(x)
        xr, xw, xk, xv, xa, xg = (x + (prev - x) * m for m in self.mu)
        r, k, v = self.split_heads(self.r_proj(xr)), self.k_proj(xk), self.split_heads(self.v_proj(xv))
        log_w = -math.exp(-0.5) * torch.sigmoid(upcast(self.w0 + torch.tanh(xw @ self.w1) @ self.w2))
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        kappa = F.normalize(self.split_heads(k * self.k_k), dim=-1)  # removal key
        k_rep = self.split_heads(k * (1 + (a - 1) * self.k_a))  # replacement key
        a = self.split_heads(a)
        bonus = (r * self.r_k * k_rep).sum(-1, keepdim=True) * v  # the current token, outside the state
        gate = torch.sigmoid(xg @ self.g1) @ self.g2
        return Features(
            r,
            k_rep,
            v,
            log_decay=self.split_heads(log_w),
            extras={"a": -kappa, "b": kappa * a, "bonus": bonus, "gate": gate},
        )

    def recurrence(self, f: Features, state, cu_seqlens):
        o, S = generalized_delta_rule(
            f.q,
            f.k,
            f.v,
            f.extras["a"],
            f.extras["b"],
            log_decay=f.log_decay,
            scale=self.scale,
            initial_state=None if state is None else state["S"],
            output_final_state=self.causal,
            cu_seqlens=cu_seqlens,
            backend=self.backend if self.backend in BACKENDS else "auto",
        )
        return o, ({} if S is None else {"S": S})

    def output(self, o: torch.Tensor, f: Features, x: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        p = self.out_norm(o) + f.extras["bonus"].to(o.dtype)
        return self.o_proj((p.reshape(B, T, -1) * f.extras["gate"]).to(x.dtype))

    def flops_per_token(self, seq_len: int) -> float:
        return 8.0 * self.n_heads * self.key_dim * self.value_dim  # decay, rank-1 update, write and read
