"""Triton kernel of the linear recurrence token by token, for decoding (T = 1) and short prompts.

Each program keeps one [K, BV] slice of one head's float32 state in registers, walks the tokens of its
sequence and writes the state back where it read it (in place when state_in is state_out):
  additive  S_t = D_t S_{t-1} + k_t^T v_t
  delta     S_t = D_t (S_{t-1} - b_t k_t^T (k_t S_{t-1})) + b_t k_t^T v_t        ("Gated Delta Networks",
            arXiv 2412.06464; any decay kind, per-key included)
  output    o_t = scale q_t S_t
Shape legend as fwd_kernels.py; g is [T, H] (scalar) or [T, H, K] (per key) log decay.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    state_in,
    state_out,
    o,
    cu,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    DELTA: tl.constexpr,
    HAS_STATE: tl.constexpr,
):
    """Grid (cdiv(V, BV), N * H); state [N, H, K, V] float32."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n)
    eos = tl.load(cu + i_n + 1)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    off_kv = i_nh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
    if HAS_STATE:
        S = tl.load(state_in + off_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(bos, eos):
        base = (t * H + i_h).to(tl.int64)
        qt = tl.load(q + base * K + rk, mask=mk, other=0.0).to(tl.float32)
        kt = tl.load(k + base * K + rk, mask=mk, other=0.0).to(tl.float32)
        vt = tl.load(v + base * V + rv, mask=mv, other=0.0).to(tl.float32)
        if DELTA:
            bt = tl.load(beta + base).to(tl.float32)
            pred = tl.sum(kt[:, None] * S, axis=0)  # k_t S_{t-1}, [BV]
            S = S - kt[:, None] * (bt * pred)[None, :]
            vt = bt * vt
        if GKIND == 1:
            S = S * tl.exp(tl.load(g + base).to(tl.float32))
        elif GKIND == 2:
            S = S * tl.exp(tl.load(g + base * K + rk, mask=mk, other=0.0).to(tl.float32))[:, None]
        S = S + kt[:, None] * vt[None, :]
        ot = tl.sum(qt[:, None] * S, axis=0) * scale
        tl.store(o + base * V + rv, ot.to(o.dtype.element_ty), mask=mv)
    tl.store(state_out + off_kv, S, mask=mkv)
