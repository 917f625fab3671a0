"""RWKV-6 "Finch" time mixing: data-dependent token shift, per-key data-dependent decay, and the bonus term u.

"Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (arXiv 2404.05892), Sec. 4:

    ddlerp_s(a, b) = a + (b - a) * (mu_s + tanh((a + (b - a) * mu_x) A) B_s)      (a = x_t, b = x_{t-1})
    r, k, v = ddlerp_{r,k,v}(x_t, x_{t-1}) W_{r,k,v},   g = swish(ddlerp_g(...) W_g)
    w_t = exp(-exp(w0 + tanh(ddlerp_w(...) A_w) B_w))                                 (per key channel)
    wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i,   o_t = r_t wkv_t
    y = (GroupNorm_head(o) * g) W_o

The sum over i < t is h_{t-1} of h_t = diag(w_t) h_{t-1} + k_t^T v_t. It runs on `linear_recurrence`
with k, v and w delayed by one token (so the recurrence's state at t is h_{t-1}); the current token
enters only through the bonus u, outside the state. State: h [N,H,K,V] and the previous input token.
"""

from __future__ import annotations

import torch
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, token_shift, upcast
from effarch.ops.linear import linear_recurrence
from effarch.registry import register_mixer

MIXES = ("w", "k", "v", "r", "g")  # the five ddlerp branches, in this order


@register_mixer(
    "rwkv6",
    family="linear/rnn",
    paper="Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence (arXiv 2404.05892)",
    debug=dict(head_dim=16, mix_low_rank_dim=8, decay_low_rank_dim=8),
    recurrent=True,
)
class RWKV6(LinearMixer):
    """Finch time mixing: ddlerp token shift, decay w = exp(-exp(.)) per key, bonus u, GroupNorm, swish gate."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        head_dim: int = 64,
        mix_low_rank_dim: int = 32,
        decay_low_rank_dim: int = 64,
        n_layers: int | None = None,
    ):
        check_divisible("d_model", d_model, "head_dim", head_dim)
        if n_layers is not None and (n_layers < 1 or layer_idx >= n_layers):
            raise ValueError(f"n_layers = {n_layers} must be positive and larger than layer_idx = {layer_idx}")
        H = d_model // head_dim
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=H,
            key_dim=head_dim,
            value_dim=head_dim,
            scale=1.0,
            norm="group",
            gate="silu",
            gate_from_x=False,
            norm_eps=64e-5,
        )
        self.n_layers = n_layers
        self.add_token_shift()
        C, D = d_model, mix_low_rank_dim
        self.mix_mu_x = nn.Parameter(torch.empty(C))
        self.mix_mu = nn.Parameter(torch.empty(len(MIXES), C))
        self.mix_A = nn.Parameter(torch.empty(C, len(MIXES) * D))
        self.mix_B = nn.Parameter(torch.empty(len(MIXES), D, C))
        self.w0 = nn.Parameter(torch.empty(C))
        self.decay_A = nn.Parameter(torch.empty(C, decay_low_rank_dim))
        self.decay_B = nn.Parameter(torch.empty(decay_low_rank_dim, C))
        self.u = nn.Parameter(torch.empty(H, head_dim))
        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.g_proj = nn.Linear(C, C, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The paper's layer-dependent initialisation of the mixing, decay and bonus parameters."""
        C, L = self.d_model, self.n_layers
        r0 = self.layer_idx / (L - 1) if L and L > 1 else 0.0  # 0 at the bottom, 1 at the top
        r1 = 1.0 - self.layer_idx / L if L else 1.0  # 1 at the bottom, ~0 at the top
        ddd = torch.arange(C, dtype=torch.float64) / C
        n = torch.arange(C, dtype=torch.float64) / max(1, C - 1)
        self.mix_mu_x.copy_(1 - ddd**r1)
        mus = {"w": 1 - ddd**r1, "k": 1 - ddd**r1, "v": 1 - (ddd**r1 + 0.3 * r0), "r": 1 - ddd ** (0.5 * r1)}
        mus["g"] = mus["r"]
        self.mix_mu.copy_(torch.stack([mus[m] for m in MIXES]))
        self.w0.copy_(-6 + 5 * n ** (0.7 + 1.3 * r0))  # slow decay in early channels, fast in late ones
        u = r0 * (1 - n) + ((torch.arange(C) + 1) % 3 - 1) * 0.1
        self.u.copy_(u.view_as(self.u))
        # Low-rank offsets start at zero: the shift begins as a plain lerp and learns to depend on data.
        self.mix_A.zero_()
        self.decay_A.zero_()
        nn.init.uniform_(self.mix_B, -0.01, 0.01)
        nn.init.uniform_(self.decay_B, -0.01, 0.01)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        B, T, C = x.shape
        dx = ctx.shift(x) - x
        lora = torch.tanh((x + dx * self.mix_mu_x) @ self.mix_A).view(B, T, len(MIXES), -1)
        mu = self.mix_mu + torch.einsum("btfd,fdc->btfc", lora, self.mix_B)  # [B, T, 5, C]
        xw, xk, xv, xr, xg = (x + dx * mu[:, :, i] for i in range(len(MIXES)))
        d = self.w0 + torch.tanh(xw @ self.decay_A) @ self.decay_B
        log_w = -torch.exp(upcast(d))
        return Features(
            self.split_heads(self.r_proj(xr)),
            self.split_heads(self.k_proj(xk)),
            self.split_heads(self.v_proj(xv)),
            log_decay=self.split_heads(log_w),
            gate=self.g_proj(xg),
        )

    def recurrence(self, f: Features, state, cu_seqlens):
        B, T, H, K = f.k.shape
        # Delay k, v, w by one token (zeros before every sequence): the state at t is then h_{t-1}.
        k_prev, k_last = token_shift(f.k.flatten(2), None, cu_seqlens)
        v_prev, v_last = token_shift(f.v.flatten(2), None, cu_seqlens)
        w_prev, w_last = token_shift(f.log_decay.flatten(2), None, cu_seqlens)
        o, S = linear_recurrence(
            f.q,
            k_prev.view_as(f.k),
            v_prev.view_as(f.v),
            log_decay=w_prev.view_as(f.log_decay),
            scale=1.0,
            initial_state=None if state is None else state["S"],
            output_final_state=self.causal,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        bonus = (f.q * self.u.to(f.q.dtype) * f.k).sum(-1, keepdim=True) * f.v
        o = o + bonus
        if S is None:
            return o, {}
        # Absorb each sequence's last token: h_T = diag(w_T) h_{T-1} + k_T^T v_T.
        kT, vT = k_last.view(-1, H, K).to(S.dtype), v_last.view(-1, H, f.v.shape[-1]).to(S.dtype)
        S = S * w_last.view(-1, H, K, 1).to(S.dtype).exp() + kT[..., None] * vT[..., None, :]
        return o, {"S": S}
