"""Titans' neural long-term memory: a linear memory trained at test time with momentum and weight decay.

"Titans: Learning to Memorize at Test Time" (arXiv 2501.00663), Sec. 3. Per head, a memory M [K, V]
is trained online on the associative loss l(M; x_t) = 1/2 || k_t M - v_t ||^2 (1/2 folded into theta):

    S_t = eta_t S_{t-1} - theta_t grad l(M'; x_t)        (momentum: "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                    (weight decay: forgetting)
    y_t = q_t M_t                                        (retrieval, no update)

with data-dependent eta_t, theta_t, alpha_t in (0, 1) (sigmoids of projections). As in the paper's
parallel training (Sec. 3.2), the gradient is taken at the memory M' at the start of the token's
mini-batch of `chunk_size` tokens (aligned to absolute positions); chunk_size = 1 is the pure per-token
rule. Inside a mini-batch every product of gates is a difference of cumulative log-gates, so outputs
come from [b, b] matrices (no per-token memory). q, k, v use SiLU after a short depthwise conv, q and k
are L2-normalised, and the read-out passes a gated RMSNorm before the output projection (Sec. 4.4).

The state holds M', M, S, the position inside the mini-batch and the conv tails: fixed size, and any
split of a sequence gives the outputs of one call (see `ttt.py` for the same argument).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.cache import RecurrentState
from effarch.layers.base import TokenMixer, check_divisible
from effarch.layers.conv import ShortConvolution
from effarch.layers.mixers.mamba import check_state_args, state_bytes
from effarch.layers.mixers.ttt import bidirectional, keep_where, run_by_rows, segments_of
from effarch.layers.norm import GatedRMSNorm
from effarch.registry import register_mixer


def _pairwise_decay(cum: torch.Tensor) -> torch.Tensor:
    """cum [B, L, H] cumulative log-gates -> [B, H, t, s] = exp(cum_t - cum_s) for s <= t, else 0."""
    L = cum.shape[1]
    c = cum.transpose(1, 2)
    mask = torch.ones(L, L, dtype=torch.bool, device=cum.device).tril()
    return torch.where(mask, c[..., :, None] - c[..., None, :], float("-inf")).exp()


@register_mixer(
    "titans",
    family="linear/ttt",
    paper="Titans: Learning to Memorize at Test Time (arXiv 2501.00663)",
    debug=dict(n_heads=4, chunk_size=4),
    recurrent=True,
)
class Titans(TokenMixer):
    """Titans long-term memory (LMM) layer with a linear memory, momentum and forgetting gates."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 4,
        head_dim: int | None = None,
        chunk_size: int = 16,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx)
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        if n_heads < 1 or head_dim < 1:
            raise ValueError(f"n_heads = {n_heads} and head_dim = {head_dim} must be positive")
        if chunk_size < 1:
            raise ValueError(f"chunk_size = {chunk_size} must be a positive number of tokens")
        self.n_heads, self.head_dim, self.chunk_size, self.conv_size = n_heads, head_dim, chunk_size, conv_size
        H, K = n_heads, head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * H * K, bias=False)
        self.convs = nn.ModuleList(ShortConvolution(H * K, conv_size, activation="silu") for _ in range(3))
        self.gate_proj = nn.Linear(d_model, 3 * H)  # alpha (forget), eta (momentum), theta (learning rate)
        self.g_proj = nn.Linear(d_model, H * K, bias=False)
        self.o_norm = GatedRMSNorm(K, eps=norm_eps)
        self.o_proj = nn.Linear(H * K, d_model, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Start remembering (alpha ~ 0.02), with strong momentum (eta ~ 0.9) and a moderate step (theta ~ 0.27).
        H = self.n_heads
        self.gate_proj.bias.copy_(torch.tensor([-4.0, 2.0, -1.0]).repeat_interleave(H))

    def _core(self, inputs: list[torch.Tensor], state: dict | None):
        """Mini-batch memory updates over q, k, v [B,T,H,K] and log-gates [B,T,H]; returns y [B,T,H,V], state."""
        q, k, v, log_keep, log_eta, theta = inputs
        B, T, H, K = q.shape
        segments = segments_of(None if state is None else state["pos"], T, self.chunk_size)
        if state is None:
            zero = q.new_zeros(B, H, K, v.shape[-1])
            state = dict(M0=zero, M=zero, S=zero, pos=torch.zeros(B, dtype=torch.long, device=q.device))
        M0, M, S = state["M0"], state["M"], state["S"]
        outs = []
        for s, e, completes in segments:
            Q, Kc, th = q[:, s:e], k[:, s:e], theta[:, s:e].transpose(1, 2)  # th [B, H, L]
            R = torch.einsum("blhk,bhkv->bhlv", Kc, M0) - v[:, s:e].transpose(1, 2)  # k_s M' - v_s
            la, le = log_keep[:, s:e].cumsum(1), log_eta[:, s:e].cumsum(1)
            A, E = _pairwise_decay(la), _pairwise_decay(le)  # prod (1 - alpha), prod eta over (s, t]
            Cm = A @ E  # weight of gradient s in M_t
            a_vec, e_vec = la.transpose(1, 2).exp(), le.transpose(1, 2).exp()  # [B, H, L]
            c_vec = (A @ e_vec[..., None])[..., 0]  # weight of the incoming momentum in M_t
            W = Cm * th[:, :, None, :]
            y = (
                a_vec[..., None] * torch.einsum("bthk,bhkv->bhtv", Q, M)
                + c_vec[..., None] * torch.einsum("bthk,bhkv->bhtv", Q, S)
                - (torch.einsum("bthk,bshk->bhts", Q, Kc) * W) @ R
            )
            outs.append(y.transpose(1, 2))
            wS = E[:, :, -1] * th  # [B, H, s]
            M = (
                a_vec[..., -1, None, None] * M
                + c_vec[..., -1, None, None] * S
                - torch.einsum("bhs,bshk,bhsv->bhkv", W[:, :, -1], Kc, R)
            )
            S = e_vec[..., -1, None, None] * S - torch.einsum("bhs,bshk,bhsv->bhkv", wS, Kc, R)
            M0 = keep_where(completes, M, M0)
        y = torch.cat(outs, 1) if outs else v
        pos_t = (state["pos"] + T) % self.chunk_size
        return y, dict(M0=M0, M=M, S=S, pos=pos_t)

    def _direction(self, raw: list[torch.Tensor], cu_seqlens, state: RecurrentState | None):
        """Convs, normalisation and memory for one direction; raw = [q, k, v projections, gate logits]."""
        B, T, _ = raw[0].shape
        H, K = self.n_heads, self.head_dim
        cd = torch.float64 if raw[0].dtype == torch.float64 else torch.float32
        qkv, tails = [], {}
        for i, (name, conv) in enumerate(zip(("q", "k", "v"), self.convs)):
            y, tails[f"conv_{name}"] = conv(
                raw[i], None if state is None else state[f"conv_{name}"], cu_seqlens=cu_seqlens
            )
            qkv.append(y.view(B, T, H, K).to(cd))
        q, k = F.normalize(qkv[0], dim=-1), F.normalize(qkv[1], dim=-1)
        g_alpha, g_eta, g_theta = raw[3].to(cd).view(B, T, 3, H).unbind(2)
        inputs = [q, k, qkv[2], F.logsigmoid(-g_alpha), F.logsigmoid(g_eta), torch.sigmoid(g_theta)]
        mem = None if state is None else {n: state[n] for n in ("M0", "M", "S", "pos")}
        y, st = run_by_rows(self._core, inputs, mem, cu_seqlens)
        return y, {**st, **tails}

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, *, cu_seqlens: torch.Tensor | None = None):
        check_state_args(self.causal, state, cu_seqlens)
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        raw = [*self.qkv_proj(x).chunk(3, dim=-1), self.gate_proj(x)]
        if self.causal:
            y, st = self._direction(raw, cu_seqlens, state)
            new_state = RecurrentState(st, seq_len=(0 if state is None else state.seq_len) + T)
        else:
            y = bidirectional(lambda ins, cu: self._direction(ins, cu, None)[0], raw, cu_seqlens)
            new_state = None
        y = self.o_norm(y.to(x.dtype), self.g_proj(x).view(B, T, H, K))
        return self.o_proj(y.reshape(B, T, H * K)), new_state

    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        H, K = self.n_heads, self.head_dim
        tails = 3 * batch * (self.conv_size - 1) * H * K
        return state_bytes(dtype, tails, matrix=3 * batch * H * K * K) + 8 * batch  # + int64 positions

    def flops_per_token(self, seq_len: int) -> float:
        H, K, b = self.n_heads, self.head_dim, self.chunk_size
        return H * (10.0 * K * K + 4.0 * b * K)
