"""xLSTM's mLSTM block: a matrix memory with exponential input gate, sigmoid forget gate, normaliser and stabiliser.

"xLSTM: Extended Long Short-Term Memory" (arXiv 2405.04517), Sec. 2.3 and App. A (per head, row form):

    C_t = f_t C_{t-1} + i_t k_t^T v_t,   n_t = f_t n_{t-1} + i_t k_t,   k_t = x W_k / sqrt(d)
    h~_t = q_t C_t / max(|q_t n_t^T|, 1),   i_t = exp(i~_t),   f_t = sigmoid(f~_t)

Stabilised with m_t = max(log f_t + m_{t-1}, i~_t): the memory kept is C'_t = exp(-m_t) C_t, which is the
linear recurrence with log decay log f_t + m_{t-1} - m_t (<= 0) and keys k_t exp(i~_t - m_t) (<= 1 times k),
and h~_t = q_t C'_t / max(|q_t n'_t^T|, exp(-m_t)) is exactly the unstabilised value. m_t is a function
of the sequence (m_t = F_t + max(m_0, max_{s<=t} (i~_s - F_s)), F the cumulative log f), carried in the
state, so any split into pieces gives the same outputs. The normaliser n' is a ones column appended to v.

Block: [x_m, z] = x W_up (proj_factor 2); q, k from silu(conv4(x_m)), v from x_m; gates from [q, k, v];
y = (GroupNorm_head(h~) + skip * conv(x_m)) * silu(z), then W_down. q, k and v use the paper's
block-diagonal projections (blocks of `qkv_block_size` channels), so the block costs about 6 d^2 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.base import check_divisible
from effarch.layers.linear_mixer import Context, Features, LinearMixer, upcast
from effarch.ops.linear import linear_recurrence
from effarch.registry import register_mixer


def mlstm_stabilizer(
    log_i: torch.Tensor, log_f: torch.Tensor, m0: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m_t = max(log_f_t + m_{t-1}, log_i_t) for log_i, log_f [B,T,H] and m0 [N,H] (float64 inside).

    Returns (m [B,T,H], m_{t-1} [B,T,H], m at the end of each sequence [N,H]), in log_i's dtype.
    """
    li, lf, m0d = log_i.double(), log_f.double(), m0.double()

    def run(li, lf, m0):  # one block of sequences [b, L, H] starting from m0 [b, H]
        Fc = lf.cumsum(1)
        m = Fc + torch.maximum(m0[:, None], (li - Fc).cummax(1).values)
        return m, torch.cat([m0[:, None], m[:, :-1]], 1)[:, : m.shape[1]]  # empty sequences stay empty

    if cu_seqlens is None:
        m, m_prev = run(li, lf, m0d)
        last = m[:, -1]
    else:
        ms, prevs, lasts = [], [], []
        bounds = cu_seqlens.tolist()
        for n in range(len(bounds) - 1):
            s, e = bounds[n], bounds[n + 1]
            m, m_prev = run(li[:, s:e], lf[:, s:e], m0d[n : n + 1])
            ms.append(m)
            prevs.append(m_prev)
            lasts.append(m[:, -1] if e > s else m0d[n : n + 1])
        m, m_prev, last = torch.cat(ms, 1), torch.cat(prevs, 1), torch.cat(lasts, 0)
    return m.to(log_i.dtype), m_prev.to(log_i.dtype), last.to(log_i.dtype)


class BlockDiagonalLinear(nn.Module):
    """y = x W with W block-diagonal: [..., n * b] -> [..., n * b], n blocks of b x b (xLSTM's headwise
    projection)."""

    def __init__(self, dim: int, block_size: int):
        super().__init__()
        check_divisible("mLSTM inner dimension", dim, "qkv_block_size", block_size)
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.weight, 0.0, (2 / (5 * self.block_size)) ** 0.5)  # xLSTM's small init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.unflatten(-1, (self.weight.shape[0], self.block_size))
        return torch.einsum("...ni,nio->...no", xb, self.weight).flatten(-2)


@register_mixer(
    "mlstm",
    family="linear/rnn",
    paper="xLSTM: Extended Long Short-Term Memory (arXiv 2405.04517)",
    debug=dict(n_heads=4, proj_factor=1.0),
    recurrent=True,
)
class MLSTM(LinearMixer):
    """mLSTM block: up-projection, conv, matrix memory with exponential input gating, GroupNorm, skip, gate."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 4,
        proj_factor: float = 2.0,
        conv_size: int = 4,
        qkv_block_size: int = 4,
        norm_eps: float = 1e-5,
    ):
        inner = int(proj_factor * d_model)
        check_divisible("proj_factor * d_model", inner, "n_heads", n_heads)
        P = inner // n_heads
        super().__init__(
            d_model,
            causal=causal,
            layer_idx=layer_idx,
            n_heads=n_heads,
            key_dim=P,
            value_dim=P,
            state_value_dim=P + 1,
            norm="group",
            gate="silu",
            gate_from_x=False,
            norm_eps=norm_eps,
        )
        self.inner = inner
        self.up_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.add_conv("x", inner, conv_size, bias=True)
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.igate = nn.Linear(3 * inner, n_heads)
        self.fgate = nn.Linear(3 * inner, n_heads)
        self.skip = nn.Parameter(torch.ones(inner))
        self.add_state("m", (n_heads,))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Gates start data-independent: forget bias linspace(3, 6) (long memory), input bias N(0, 0.1)."""
        for g in (self.igate, self.fgate):
            g.weight.zero_()
        self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.n_heads))
        nn.init.normal_(self.igate.bias, 0.0, 0.1)

    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        xm, z = self.up_proj(x).chunk(2, dim=-1)
        xc = ctx.conv("x", xm)
        q, k, v = self.q_proj(xc), self.k_proj(xc), self.v_proj(xm)
        qkv = torch.cat([q, k, v], dim=-1)
        v = self.split_heads(v)
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # the last column accumulates n_t
        log_f = F.logsigmoid(upcast(self.fgate(qkv)))
        extras = {"log_i": upcast(self.igate(qkv)), "log_f": log_f, "skip": xc}
        return Features(self.split_heads(q), self.split_heads(k), v, gate=z, extras=extras)

    def recurrence(self, f: Features, state, cu_seqlens):
        log_i, log_f = f.extras["log_i"], f.extras["log_f"]
        n = f.q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        m0 = log_i.new_zeros(n, self.n_heads) if state is None else state["m"]
        m, m_prev, m_last = mlstm_stabilizer(log_i, log_f, m0, cu_seqlens)
        k = (f.k * torch.exp(log_i - m)[..., None]).to(f.k.dtype)
        o, S = linear_recurrence(
            f.q,
            k,
            f.v,
            log_decay=log_f + m_prev - m,
            scale=self.scale,
            initial_state=None if state is None else state["S"],
            output_final_state=self.causal,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        o = upcast(o)
        h = o[..., :-1] / torch.maximum(o[..., -1:].abs(), torch.exp(-m)[..., None])
        return h.to(f.q.dtype), ({} if S is None else {"S": S, "m": m_last.to(S.dtype)})

    def output(self, o: torch.Tensor, f: Features, x: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        h = self.out_norm(o).flatten(-2) + self.skip * f.extras["skip"]
        h = upcast(h) * F.silu(upcast(f.gate))
        return self.o_proj(h.to(x.dtype))
