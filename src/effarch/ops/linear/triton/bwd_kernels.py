"""Triton kernels of the chunked linear recurrence, backward pass.

With dS the gradient of the loss with respect to the state leaving a chunk (row convention, see
fwd_kernels.py for the forward terms), the gradient with respect to the state entering it is
  additive  dS_0 = e^{G_C} dS + scale (Q e^G)^T dO
  delta     dU = scale ((Q K^T) * Gamma * M)^T dO + (K e^R) dS,
            dS_0 = e^{G_C} dS + scale (Q e^G)^T dO - W^T dU
(e^{G_C} is a [K] vector for per-key decay). The pass runs backwards through each sequence's chunks and
stores dS for every chunk; everything else in the backward is chunk-local: `dv_local_kernel` (dv, or the
delta rule's chunk-local dU before the pass), `dqk_kernel` (dq, dk, and dW for the delta rule),
`wy_bwd_kernel` (the delta rule's WY transform) and for per-key decay `gla_intra_bwd_kernel`. The work is
split so that no kernel holds more than a few [BT, K] float32 tiles (one kernel doing it all spilled
kilobytes of registers per thread). Shape legend as fwd_kernels.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from effarch.ops.linear.triton.fwd_kernels import chunk_tile, last_log_decay, mm, operand, sequence_of


@triton.jit
def state_bwd_kernel(
    q,
    k,
    W,
    G,
    do,
    dhbuf,
    dhT,
    dh0,
    dU,
    D,
    cu,
    seq_chunk,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    DELTA: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    DTC: tl.constexpr,
    PRE: tl.constexpr = False,
):
    """dhbuf[c] = gradient w.r.t. the state leaving chunk c ([NT, H, K, V]; float32, or the inputs' dtype with
    backward.STATE_GRAD_BUFFER = "input"); dh0 = gradient w.r.t. the initial state; delta rule: dU [T, H, V]
    (gradient w.r.t. the pseudo-values; float32, or the inputs' dtype with backward.DELTA_GRAD_BUFFERS = "input").
    With PRE, D[c] [NT, H, K, V] float32 holds the chunk's own term scale (Q e^G)^T dO (`chunk_outer_kernel`; D may
    be dhbuf itself, as slot c is read before dS is written there): the additive rule's pass then only decays and
    adds, the delta rule's takes two products per chunk instead of three. Grid (cdiv(V, BV), cdiv(K, BK), N * H)."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, bos, eos, c0, c1 = sequence_of(cu, seq_chunk, i_nh, H)
    rb = tl.arange(0, BT)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    off_kv = rk[:, None] * V + rv[None, :]
    if HAS_DHT:
        dS = tl.load(dhT + i_nh.to(tl.int64) * K * V + off_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    if PRE:  # the next chunk's term is loaded one iteration ahead, so its load overlaps the current update
        nxt = tl.load(
            D + ((c1 - 1) * H + i_h).to(tl.int64) * K * V + off_kv, mask=mkv & (off_kv * 0 + c1 > c0), other=0.0
        )
    for j in range(0, c1 - c0):
        c = c1 - 1 - j
        t0 = bos + (c - c0) * BT
        if PRE:
            own = nxt
            nxt = tl.load(
                D + ((c - 1) * H + i_h).to(tl.int64) * K * V + off_kv, mask=mkv & (off_kv * 0 + c > c0), other=0.0
            )
        tl.store(dhbuf + (c * H + i_h).to(tl.int64) * K * V + off_kv, dS.to(dhbuf.dtype.element_ty), mask=mkv)
        rt = t0 + rb
        mt = rt < eos
        t_last = tl.minimum(t0 + BT, eos) - 1
        if PRE and not DELTA:  # decay and add: nothing per token is read
            if GKIND == 1:
                dS = dS * tl.exp(last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND))
            elif GKIND == 2:
                dS = dS * tl.exp(last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND))[:, None]
            dS += own
        else:
            m_tk = mt[:, None] & mk[None, :]
            m_tv = mt[:, None] & mv[None, :]
            off_tk = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
            off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
            if GKIND == 1:
                gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
                gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)  # G at the chunk's last token (0 if empty)
                decay_last = tl.exp(gl)
            elif GKIND == 2:
                gt = tl.load(G + off_tk, mask=m_tk, other=0.0)
                gl = last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND)
                decay_last = tl.exp(gl)[:, None]
            else:
                decay_last = 1.0
            if PRE:
                local = own
            else:
                qq = tl.load(q + off_tk, mask=m_tk, other=0.0).to(tl.float32)
                dd = tl.load(do + off_tv, mask=m_tv, other=0.0)
                if GKIND == 1:
                    qs = qq * tl.exp(gt)[:, None]
                elif GKIND == 2:
                    qs = qq * tl.exp(gt)
                else:
                    qs = qq
                local = scale * mm(tl.trans(qs), dd, DTC)
            if DELTA:
                kk = tl.load(k + off_tk, mask=m_tk, other=0.0).to(tl.float32)
                if GKIND == 1:
                    kd = kk * tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
                else:
                    kd = kk
                # dU holds the chunk-local part scale P^T dO (`dv_local_kernel`); the state's part is added in place
                du = tl.load(dU + off_tv, mask=m_tv, other=0.0) + mm(kd, dS, DTC)
                tl.store(dU + off_tv, du.to(dU.dtype.element_ty), mask=m_tv)
                # W^T loaded as [K, BT] directly rather than transposed in registers
                wT = tl.load(
                    W + (rt.to(tl.int64)[None, :] * H + i_h) * K + rk[:, None],
                    mask=mk[:, None] & mt[None, :],
                    other=0.0,
                )
                dS = dS * decay_last + local - mm(wT, du, DTC)
            else:
                dS = dS * decay_last + local
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + off_kv, dS, mask=mkv)


@triton.jit
def _delta_bwd_half(q, k, W, dd, dS, tok, mt, rows, kscale, qscale, scale, own,
                    K: tl.constexpr, GKIND: tl.constexpr, DTC: tl.constexpr, PRE: tl.constexpr):  # fmt: skip
    """One 64-key half of the delta rule's reverse step: (its share k dS of dU, and the [64, BV] tiles it needs
    for the state update: scale (Q e^G)^T dO and W^T, loaded as [64, BT])."""
    m_tk = mt[:, None] & (rows < K)[None, :]
    kk = tl.load(k + tok[:, None] * K + rows[None, :], mask=m_tk, other=0.0)
    if GKIND == 1:
        kk = operand(kk.to(tl.float32) * kscale[:, None], DTC)
    share = mm(kk, dS, DTC)
    if PRE:
        local = own
    else:
        qq = tl.load(q + tok[:, None] * K + rows[None, :], mask=m_tk, other=0.0)
        if GKIND == 1:
            qq = operand(qq.to(tl.float32) * qscale[:, None], DTC)
        local = scale * mm(tl.trans(qq), dd, DTC)
    wT = tl.load(W + tok[None, :] * K + rows[:, None], mask=(rows < K)[:, None] & mt[None, :], other=0.0)
    return share, local, wT


@triton.jit
def delta_state_bwd_kernel(
    q,
    k,
    W,
    G,
    do,
    dhbuf,
    dhT,
    dh0,
    dU,
    D,
    cu,
    seq_chunk,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    DTC: tl.constexpr,
    PRE: tl.constexpr,
):
    """The delta rule's reverse state pass (state_bwd_kernel with DELTA, K <= 128, no decay or a scalar one) with
    the state gradient held as two [64, BV] tiles of keys instead of one [K, BV]: every product is then 64 keys
    deep or wide, which the compiler keeps in fewer registers (fla's reverse pass takes the same split). Every key
    stays in the program, as dU needs them all. Same inputs and outputs as state_bwd_kernel; grid
    (cdiv(V, BV), N * H)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, c0, c1 = sequence_of(cu, seq_chunk, i_nh, H)
    rb = tl.arange(0, BT)
    r1 = tl.arange(0, 64)
    r2 = 64 + r1
    rv = i_v * BV + tl.arange(0, BV)
    mv = rv < V
    m1 = (r1 < K)[:, None] & mv[None, :]
    m2 = (r2 < K)[:, None] & mv[None, :]
    off1 = r1[:, None] * V + rv[None, :]
    off2 = r2[:, None] * V + rv[None, :]
    state0 = i_nh.to(tl.int64) * K * V
    dS1 = tl.zeros([64, BV], dtype=tl.float32)
    dS2 = tl.zeros([64, BV], dtype=tl.float32)
    if HAS_DHT:
        dS1 += tl.load(dhT + state0 + off1, mask=m1, other=0.0).to(tl.float32)
        if K > 64:
            dS2 += tl.load(dhT + state0 + off2, mask=m2, other=0.0).to(tl.float32)
    own1 = dS1
    own2 = dS2
    for j in range(0, c1 - c0):
        c = c1 - 1 - j
        t0 = bos + (c - c0) * BT
        chunk0 = (c * H + i_h).to(tl.int64) * K * V
        if PRE:  # the chunk's own term scale (Q e^G)^T dO from chunk_outer_kernel, read before dS takes its slot
            own1 = tl.load(D + chunk0 + off1, mask=m1, other=0.0)
            if K > 64:
                own2 = tl.load(D + chunk0 + off2, mask=m2, other=0.0)
        tl.store(dhbuf + chunk0 + off1, dS1.to(dhbuf.dtype.element_ty), mask=m1)
        if K > 64:
            tl.store(dhbuf + chunk0 + off2, dS2.to(dhbuf.dtype.element_ty), mask=m2)
        rt = t0 + rb
        mt = rt < eos
        t_last = tl.minimum(t0 + BT, eos) - 1
        tok = rt.to(tl.int64) * H + i_h
        if GKIND == 1:
            gt = tl.load(G + tok, mask=mt, other=0.0)
            gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)  # G at the chunk's last token (0 if empty)
            decay_last = tl.exp(gl)
            kscale = tl.exp(tl.where(mt, gl - gt, float("-inf")))
            qscale = tl.exp(gt)
        else:
            decay_last = 1.0
            kscale = tl.zeros([BT], dtype=tl.float32)  # unused without a decay
            qscale = kscale
        m_tv = mt[:, None] & mv[None, :]
        off_tv = tok[:, None] * V + rv[None, :]
        dd = tl.load(do + off_tv, mask=m_tv, other=0.0)
        share1, local1, w1 = _delta_bwd_half(q, k, W, dd, dS1, tok, mt, r1, kscale, qscale, scale, own1,
                                             K, GKIND, DTC, PRE)  # fmt: skip
        # dU holds the chunk-local part scale P^T dO (`dv_local_kernel`); the state's part is added in place
        du = tl.load(dU + off_tv, mask=m_tv, other=0.0) + share1
        if K > 64:
            share2, local2, w2 = _delta_bwd_half(q, k, W, dd, dS2, tok, mt, r2, kscale, qscale, scale, own2,
                                                 K, GKIND, DTC, PRE)  # fmt: skip
            du += share2
        tl.store(dU + off_tv, du.to(dU.dtype.element_ty), mask=m_tv)
        dS1 = dS1 * decay_last + local1 - mm(w1, du, DTC)
        if K > 64:
            dS2 = dS2 * decay_last + local2 - mm(w2, du, DTC)
    if STORE_DH0:
        tl.store(dh0 + state0 + off1, dS1, mask=m1)
        if K > 64:
            tl.store(dh0 + state0 + off2, dS2, mask=m2)


@triton.jit
def dv_local_kernel(
    q,
    k,
    G,
    A,
    dhbuf,
    do,
    out,
    chunk_tok,
    chunk_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    ADD_STATE: tl.constexpr,
    DTC: tl.constexpr,
    BKS: tl.constexpr,
):
    """out = scale (Q K^T * Gamma * M)^T dO for one chunk, head and BV columns, plus (K e^R) dS with
    ADD_STATE (dS = dhbuf[c], the gradient w.r.t. the state leaving the chunk): the additive rule's dv, or the
    delta rule's chunk-local part of dU before the reverse state pass adds the rest. Per-key decay reads the
    intra-chunk scores from A and takes the state term in blocks of BKS keys (whole-K float32 tiles spilled
    registers on sm_90). Grid (cdiv(V, BV), NT, H)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos, rb, rt, mt, rk, rv, mk, mv, m_tk, m_tv, off_tk, off_tv = chunk_tile(
        chunk_tok, chunk_eos, i_c, i_h, i_v, H, K, V, BT, BK, BV
    )
    # transposed scores pT[s, t] (key s, query t), nonzero for t >= s
    causal_t = (rb[:, None] <= rb[None, :]) & mt[None, :]
    t_last = tl.minimum(t0 + BT, eos) - 1
    if GKIND == 2:
        pT = tl.load(A + (rt.to(tl.int64)[None, :] * H + i_h) * BT + rb[:, None], mask=causal_t, other=0.0)
    else:
        kk = tl.load(k + off_tk, mask=m_tk, other=0.0)
        qq = tl.load(q + off_tk, mask=m_tk, other=0.0)
        pT = mm(kk, tl.trans(qq), DTC)
        if GKIND == 1:
            gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
            pT = pT * tl.exp(tl.where(causal_t, gt[None, :] - gt[:, None], float("-inf")))
        pT = tl.where(causal_t, pT, 0.0)
    dd = tl.load(do + off_tv, mask=m_tv, other=0.0)
    acc = scale * mm(pT, dd, DTC)
    if ADD_STATE and GKIND == 2:
        for i_k in tl.static_range(0, (K + BKS - 1) // BKS):
            rks = i_k * BKS + tl.arange(0, BKS)
            mks = rks < K
            m_tks = mt[:, None] & mks[None, :]
            off_tks = (rt.to(tl.int64)[:, None] * H + i_h) * K + rks[None, :]
            gk = tl.load(G + off_tks, mask=m_tks, other=0.0)
            gl = last_log_decay(G, t0, t_last, i_h, rks, mks, H, K, GKIND)
            kd = tl.load(k + off_tks, mask=m_tks, other=0.0).to(tl.float32)
            kd = kd * tl.exp(tl.where(mt[:, None], gl[None, :] - gk, float("-inf")))
            ds = tl.load(
                dhbuf + (i_c * H + i_h).to(tl.int64) * K * V + rks[:, None] * V + rv[None, :],
                mask=mks[:, None] & mv[None, :],
                other=0.0,
            )
            acc += mm(kd, ds, DTC)
    elif ADD_STATE:
        ds = tl.load(
            dhbuf + (i_c * H + i_h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :],
            mask=mk[:, None] & mv[None, :],
            other=0.0,
        )
        if GKIND == 1:  # (K e^R) dS = e^R (K dS) for a scalar decay: no float32 copy of K
            gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)
            acc += mm(kk, ds, DTC) * tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
        else:
            acc += mm(kk, ds, DTC)
    tl.store(out + off_tv, acc.to(out.dtype.element_ty), mask=m_tv)


@triton.jit
def dqk_kernel(
    q,
    k,
    u,
    G,
    hbuf,
    dhbuf,
    do,
    dU,
    dq,
    dk,
    dw,
    dgx,
    dA,
    chunk_tok,
    chunk_eos,
    scale,
    n_tok,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BKF: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    DELTA: tl.constexpr,
    DTC: tl.constexpr,
    later=None,
    LATER: tl.constexpr = False,
):
    """dq and dk of one chunk and head, given S_0 = hbuf[c] entering it and dS = dhbuf[c] leaving it; u is V
        (additive) or the pseudo-values U (delta). Grid (NT, H, cdiv(K, BK)): BK columns of dq and dk per program
    (BKF >= K). With P = scale (Q K^T * Gamma * M), dP = dO U^T:
          dq = scale e^G (dO S_0^T) + (dP * scale Gamma M) K,   dk = e^R (U dS^T) + (dP * scale Gamma M)^T Q.
        Per-key decay stores only the inter-chunk terms (float32) and dA = scale dP, for `gla_intra_bwd_kernel`.
        Scalar decay, additive rule: dgx = sum_K (q dq - k dk) per token (float32), for the decay-gradient identity.
        Delta rule: dk (the WY backward adds to it), dw = -dU S_0^T (both as dU), and with scalar decay dgx = the
        gradient w.r.t. the chunk-local cumsum G from the terms here (the WY backward adds its own and sums).
        dgx is [cdiv(K, BK), n_tok, H]: each program writes its key block's share, summed afterwards.
        LATER (additive rule with a decay): the later chunks' share of the decay gradient, sum_{u after the chunk}
        (q_u dq_u - k_u dk_u) + sum_V S_T dS_T, is the state leaving the chunk times its gradient summed over V,
        e^{G_C} sum_V (S_0 * dS) + sum_t k_t dk_t(inter-chunk part) per key: per-key decay stores it to
        later [NT, H, K] (for `chunk_suffix_kernel`); scalar decay adds it to the chunk's own reverse cumsum and
        dgx holds the decay gradient itself (each key block's share)."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rb = tl.arange(0, BT)
    rt = t0 + rb
    mt = rt < eos
    rk = i_k * BK + tl.arange(0, BK)
    mk = rk < K
    m_tk = mt[:, None] & mk[None, :]
    off_tk = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
    off_gx = (i_k * n_tok + rt.to(tl.int64)) * H + i_h
    causal = (rb[:, None] >= rb[None, :]) & mt[:, None]
    t_last = tl.minimum(t0 + BT, eos) - 1
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dp = tl.zeros([BT, BT], dtype=tl.float32)
    if DELTA:
        dw_acc = tl.zeros([BT, BK], dtype=tl.float32)
    if DELTA and GKIND == 1:
        ds_s0 = tl.zeros([BV], dtype=tl.float32)
    STATE_TERM: tl.constexpr = LATER and not DELTA and GKIND > 0
    if STATE_TERM:
        s_ds = tl.zeros([BK], dtype=tl.float32)  # sum_V S_0 * dS per key
    for i_v in range(0, tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        m_tv = mt[:, None] & mv[None, :]
        off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
        # S_0^T and dS^T loaded as [BV, K]
        off_vk = (i_c * H + i_h).to(tl.int64) * K * V + rk[None, :] * V + rv[:, None]
        m_vk = mv[:, None] & mk[None, :]
        s0T = tl.load(hbuf + off_vk, mask=m_vk, other=0.0)
        dsT = tl.load(dhbuf + off_vk, mask=m_vk, other=0.0)
        dd = tl.load(do + off_tv, mask=m_tv, other=0.0)
        uu = tl.load(u + off_tv, mask=m_tv, other=0.0)
        dq_acc += mm(dd, s0T, DTC)
        dk_acc += mm(uu, dsT, DTC)
        dp += mm(dd, tl.trans(uu), DTC)
        if DELTA:
            du = tl.load(dU + off_tv, mask=m_tv, other=0.0)
            dw_acc -= mm(du, s0T, DTC)
            if GKIND == 1:
                ds_s0 += tl.sum(s0T.to(tl.float32) * dsT, axis=1)
        if STATE_TERM:
            s_ds += tl.sum(s0T.to(tl.float32) * dsT.to(tl.float32), axis=0)
    if DELTA:  # dw is whole: stored first, its tile's registers free for what follows
        tl.store(dw + off_tk, dw_acc.to(dw.dtype.element_ty), mask=m_tk)
    # decay factors: eq = e^G (for Q), ek = e^{G_C - G} (for K), gam = Gamma
    if GKIND == 1:
        gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
        gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)
        eq = tl.exp(gt)[:, None]
        ek = tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
    elif GKIND == 2:
        gt = tl.load(G + off_tk, mask=m_tk, other=0.0)
        gl = tl.sum(tl.where((rt == t_last)[:, None], gt, 0.0), axis=0)  # 1.04 ms against 1.59 read as a row (H200)
        eq = tl.exp(gt)
        ek = tl.exp(tl.where(mt[:, None], gl[None, :] - gt, float("-inf")))
    else:
        eq = 1.0
        ek = 1.0
    dq_in = dq_acc * (scale * eq)
    dk_st = dk_acc * ek
    dp = tl.where(causal, dp, 0.0)
    if STATE_TERM:  # the later chunks' share, per key
        kl = tl.load(k + off_tk, mask=m_tk, other=0.0).to(tl.float32)
        later_k = tl.sum(kl * dk_st, axis=0) + tl.exp(gl) * s_ds
    if GKIND == 2:
        tl.store(dq + off_tk, dq_in.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + off_tk, dk_st.to(dk.dtype.element_ty), mask=m_tk)
        if STATE_TERM:
            tl.store(later + (i_c * H + i_h).to(tl.int64) * K + rk, later_k, mask=mk)
        if i_k == 0:
            tl.store(dA + (rt.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :], dp * scale, mask=mt[:, None])
    else:
        qq = tl.load(q + off_tk, mask=m_tk, other=0.0)
        kk = tl.load(k + off_tk, mask=m_tk, other=0.0)
        dsc = dp * scale
        if GKIND == 1:
            gam = tl.exp(tl.where(causal, gt[:, None] - gt[None, :], float("-inf")))
            dsc = dsc * gam
        if GKIND == 1 and DELTA:
            # gradient w.r.t. G from e^G in the inter-chunk output, e^{G_C - G} in the state update, the decayed
            # state itself (at the chunk's last token) and the score decay in P; formed before dq and dk so that
            # the inter-chunk tiles are consumed into them (fewer tiles live at once)
            dG = tl.sum(dq_in * qq.to(tl.float32), axis=1)
            dkst_k = tl.sum(dk_st * kk.to(tl.float32), axis=1)
            dG -= dkst_k
            dGl = tl.sum(dkst_k, axis=0) + tl.exp(gl) * tl.sum(ds_s0, axis=0)
            dG += tl.where(rt == t_last, dGl, 0.0)
            if i_k == 0:  # the score decay needs the scores, over all keys
                if BK == BKF:  # this program holds every key already
                    qa, ka = qq, kk
                else:
                    rkf = tl.arange(0, BKF)
                    off_f = (rt.to(tl.int64)[:, None] * H + i_h) * K + rkf[None, :]
                    m_f = mt[:, None] & (rkf < K)[None, :]
                    qa = tl.load(q + off_f, mask=m_f, other=0.0)
                    ka = tl.load(k + off_f, mask=m_f, other=0.0)
                p = tl.where(causal, mm(qa, tl.trans(ka), DTC) * gam, 0.0) * scale
                d1 = dp * p
                dG += tl.sum(d1, axis=1) - tl.sum(d1, axis=0)
            tl.store(dgx + off_gx, tl.where(mt, dG, 0.0), mask=mt)
        dqq = dq_in + mm(dsc, kk, DTC)
        if GKIND == 1 and not DELTA:
            xq = tl.sum(qq.to(tl.float32) * dqq, axis=1)
        tl.store(dq + off_tk, dqq.to(dq.dtype.element_ty), mask=m_tk)
        dkk = dk_st + mm(tl.trans(dsc), qq, DTC)
        tl.store(dk + off_tk, dkk.to(dk.dtype.element_ty), mask=m_tk)
        if GKIND == 1 and not DELTA:
            x = xq - tl.sum(kk.to(tl.float32) * dkk, axis=1)
            if STATE_TERM:
                tl.store(dgx + off_gx, chunk_reverse_cumsum(x) + tl.sum(later_k, axis=0), mask=mt)
            else:
                tl.store(dgx + off_gx, x, mask=mt)


@triton.jit
def wy_bwd_kernel(
    k,
    v,
    G,
    beta,
    X,
    dU,
    dk_part,
    dw,
    dgx,
    dk,
    dv,
    dbeta,
    dg,
    chunk_tok,
    chunk_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    DTC: tl.constexpr,
):
    """Delta rule: the backward of the WY/UT transform of one chunk and head. From U~ = X diag(b) V,
    W = X diag(b e^G) K, (I + A) X = I, A = strictly-lower(diag(b) (K K^T * Gamma)) and dW, dU:
      dX = dW (diag(b e^G) K)^T + dU (diag(b) V)^T,  dA = -X^T dX X^T,  dv = b X^T dU,
      dk = dk_part + b e^G X^T dW + (dA b Gamma) K + (dA b Gamma)^T K,  dbeta likewise;
    scalar decay: dg = the chunk-local reverse cumsum of dgx plus the terms here. Grid (NT, H)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rb = tl.arange(0, BT)
    rt = t0 + rb
    mt = rt < eos
    rk = tl.arange(0, BK)
    mk = rk < K
    m_tk = mt[:, None] & mk[None, :]
    off_tk = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
    bt = tl.load(beta + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0).to(tl.float32)
    # X^T [BT, BT] loaded transposed: xT[s, t] = X[t, s], zero above the block diagonal of X
    xT = tl.load(X + (rt.to(tl.int64)[None, :] * H + i_h) * BT + rb[:, None],
                 mask=mt[None, :] & (rb[:, None] // BC <= rb[None, :] // BC), other=0.0)  # fmt: skip
    dxu = tl.zeros([BT, BT], dtype=tl.float32)
    dbeta_acc = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        m_tv = mt[:, None] & mv[None, :]
        off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
        du = tl.load(dU + off_tv, mask=m_tv, other=0.0)
        vv = tl.load(v + off_tv, mask=m_tv, other=0.0).to(tl.float32)
        dxu += mm(du, tl.trans(vv * bt[:, None]), DTC)
        dru = mm(xT, du, DTC)  # X^T dU
        tl.store(dv + off_tv, (dru * bt[:, None]).to(dv.dtype.element_ty), mask=m_tv)
        dbeta_acc += tl.sum(dru * vv, axis=1)
    causal = (rb[:, None] >= rb[None, :]) & mt[:, None]
    strict = (rb[:, None] > rb[None, :]) & mt[:, None]
    kk = tl.load(k + off_tk, mask=m_tk, other=0.0)
    kf = kk.to(tl.float32)
    if GKIND == 1:
        gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
        eq = tl.exp(gt)[:, None]
        gam = tl.exp(tl.where(causal, gt[:, None] - gt[None, :], float("-inf")))
    else:
        eq = 1.0
    kg = kf * eq  # e^G K
    rw = kg * bt[:, None]  # diag(b e^G) K
    dww = tl.load(dw + off_tk, mask=m_tk, other=0.0)
    dx = mm(dww, tl.trans(rw), DTC) + dxu
    drw = mm(xT, dww, DTC)  # X^T dW
    dkk = tl.load(dk_part + off_tk, mask=m_tk, other=0.0) + drw * eq * bt[:, None]
    dbeta_acc += tl.sum(drw * kg, axis=1)
    if GKIND == 1:  # the gradient w.r.t. the chunk-local cumsum G: e^G in diag(b e^G) K (formed while drw is live)
        dG = tl.load(dgx + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0) + tl.sum(drw * rw, axis=1)
    da = -mm(xT, mm(dx, xT, DTC), DTC)  # -X^T dX X^T
    da = tl.where(strict, da, 0.0)
    kkt = mm(kk, tl.trans(kk), DTC)
    if GKIND == 1:
        kkt = kkt * gam
    kkt = tl.where(strict, kkt, 0.0)
    dbeta_acc += tl.sum(da * kkt, axis=1)
    mmat = da * bt[:, None]
    if GKIND == 1:
        d2 = mmat * kkt  # the score decay in A
        dG += tl.sum(d2, axis=1) - tl.sum(d2, axis=0)
        mmat = mmat * gam
    tl.store(dbeta + rt.to(tl.int64) * H + i_h, dbeta_acc.to(dbeta.dtype.element_ty), mask=mt)
    if GKIND == 1:  # dg = the reverse cumsum of dG within the chunk
        dG = tl.where(mt, dG, 0.0)
        dgg = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
        tl.store(dg + rt.to(tl.int64) * H + i_h, dgg, mask=mt)
    dkk += mm(mmat, kf, DTC) + mm(tl.trans(mmat), kf, DTC)
    tl.store(dk + off_tk, dkk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def gla_intra_bwd_kernel(
    q,
    k,
    G,
    dA,
    dq,
    dk,
    dqo,
    dko,
    xg,
    chunk_tok,
    chunk_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DTC: tl.constexpr,
    SPREAD: tl.constexpr = 40.0,
):
    """Per-key decay: adds the intra-chunk terms to dq and dk (float32, holding the inter-chunk ones), writes
    the sums to dqo and dko (the inputs' dtype) and xg = q dq - k dk (float32, for the decay-gradient identity):
      dq_t += sum_{s<=t} dA_ts k_s e^{G_t - G_s},   dk_s += sum_{t>=s} dA_ts q_t e^{G_t - G_s},
    for the BC rows of sub-block i, with the same splitting of exponents as `gla_intra_kernel`: when the decay
    inside sub-block i spans at most SPREAD, one product each, split at its first token m for dq
    (exp(G_t - G_m) <= 1, exp(G_m - G_s) <= e^SPREAD) and at its last token l for dk (exp(G_t - G_l) <=
    e^SPREAD for t in the sub-block, <= 1 after it; exp(G_l - G_s) <= 1). Every term is per key, so the keys
    may be cut into blocks of BK, each choosing its form by its own spread. Grid (NT * BT / BC, H, cdiv(K, BK))."""
    NB: tl.constexpr = BT // BC
    i_x, i_h, i_kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c = i_x // NB
    i = i_x % NB
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rc = tl.arange(0, BC)
    rb = tl.arange(0, BT)
    rk = i_kb * BK + tl.arange(0, BK)
    mk = rk < K
    ri = t0 + i * BC + rc
    mi = ri < eos
    m_ik = mi[:, None] & mk[None, :]
    off_i = (ri.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
    gi = tl.load(G + off_i, mask=m_ik, other=0.0)
    rs = t0 + rb
    ms = rs < eos
    off_s = (rs.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
    m0 = t0 + i * BC
    l0 = tl.minimum(m0 + BC, eos) - 1
    gm = tl.load(G + (m0.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + m0 < eos), other=0.0)
    gl = tl.load(G + (l0.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + l0 >= m0), other=0.0)
    if tl.max(gm - gl, axis=0) <= SPREAD:
        # dq: keys s up to the sub-block's end (dA is zero above the diagonal), split at m
        mb = (rb < (i + 1) * BC) & ms & (rb * 0 + m0 < eos)  # none for a sub-block past the end (G_m read as 0)
        ks = tl.load(k + off_s, mask=mb[:, None] & mk[None, :], other=0.0).to(tl.float32)
        gs = tl.load(G + off_s, mask=mb[:, None] & mk[None, :], other=0.0)
        ks = ks * tl.exp(tl.where(mb[:, None], gm[None, :] - gs, float("-inf")))
        da_i = tl.load(dA + (ri.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :],
                       mask=mi[:, None] & (rb[None, :] <= i * BC + rc[:, None]), other=0.0)  # fmt: skip
        acc_q = mm(da_i, ks, DTC) * tl.exp(tl.where(mi[:, None], gi - gm[None, :], float("-inf")))
        # dk: queries t from the sub-block's start, split at l
        ma = (rb >= i * BC) & ms & (rb * 0 + m0 < eos)
        qs = tl.load(q + off_s, mask=ma[:, None] & mk[None, :], other=0.0).to(tl.float32)
        gs2 = tl.load(G + off_s, mask=ma[:, None] & mk[None, :], other=0.0)
        qs = qs * tl.exp(tl.where(ma[:, None], gs2 - gl[None, :], float("-inf")))
        # dA[:, sub-block i] transposed: [BC, BT], row s holds dA[t, s] for t >= s
        da_t = tl.load(dA + (rs.to(tl.int64)[None, :] * H + i_h) * BT + i * BC + rc[:, None],
                       mask=ma[None, :] & mi[:, None] & (rb[None, :] >= i * BC + rc[:, None]), other=0.0)  # fmt: skip
        acc_k = mm(da_t, qs, DTC) * tl.exp(tl.where(mi[:, None], gl[None, :] - gi, float("-inf")))
    else:
        acc_q, acc_k = _gla_intra_bwd_by_columns(
            q, k, G, dA, gi, t0, eos, i, i_h, ri, mi, rc, rb, rk, mk, rs, ms, off_s, H, K, BT, BC, BK, NB, DTC
        )
    dq_new = tl.load(dq + off_i, mask=m_ik, other=0.0) + acc_q
    dk_new = tl.load(dk + off_i, mask=m_ik, other=0.0) + acc_k
    tl.store(dqo + off_i, dq_new.to(dqo.dtype.element_ty), mask=m_ik)
    tl.store(dko + off_i, dk_new.to(dko.dtype.element_ty), mask=m_ik)
    qi = tl.load(q + off_i, mask=m_ik, other=0.0).to(tl.float32)
    ki = tl.load(k + off_i, mask=m_ik, other=0.0).to(tl.float32)
    tl.store(xg + off_i, qi * dq_new - ki * dk_new, mask=m_ik)


@triton.jit
def _gla_intra_bwd_by_columns(q, k, G, dA, gi, t0, eos, i, i_h, ri, mi, rc, rb, rk, mk, rs, ms, off_s,
                              H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                              NB: tl.constexpr, DTC: tl.constexpr):  # fmt: skip
    """`gla_intra_bwd_kernel`'s (dq, dk) terms of sub-block i when its decay spread is too large for one product."""
    acc_q = tl.zeros([BC, BK], dtype=tl.float32)
    acc_k = tl.zeros([BC, BK], dtype=tl.float32)
    if i > 0:  # keys in earlier sub-blocks, split at r (the token before sub-block i)
        r = t0 + i * BC - 1
        gr = tl.load(G + (r.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + r < eos), other=0.0)
        mb = (rb < i * BC) & ms
        ks = tl.load(k + off_s, mask=mb[:, None] & mk[None, :], other=0.0).to(tl.float32)
        gs = tl.load(G + off_s, mask=mb[:, None] & mk[None, :], other=0.0)
        ks = ks * tl.exp(tl.where(mb[:, None], gr[None, :] - gs, float("-inf")))
        da_i = tl.load(dA + (ri.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :],
                       mask=mi[:, None] & (rb[None, :] < i * BC), other=0.0)  # fmt: skip
        acc_q = mm(da_i, ks, DTC) * tl.exp(tl.where(mi[:, None], gi - gr[None, :], float("-inf")))
    if i < NB - 1:  # queries in later sub-blocks, split at r2 (the last valid token of sub-block i)
        r2 = tl.minimum(t0 + i * BC + BC, eos) - 1
        gr2 = tl.load(G + (r2.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + r2 >= t0), other=0.0)
        ma = (rb >= (i + 1) * BC) & ms
        qs = tl.load(q + off_s, mask=ma[:, None] & mk[None, :], other=0.0).to(tl.float32)
        gs2 = tl.load(G + off_s, mask=ma[:, None] & mk[None, :], other=0.0)
        qs = qs * tl.exp(tl.where(ma[:, None], gs2 - gr2[None, :], float("-inf")))
        # dA[:, sub-block i] transposed: [BC, BT]
        da_t = tl.load(dA + (rs.to(tl.int64)[None, :] * H + i_h) * BT + i * BC + rc[:, None],
                       mask=ma[None, :] & mi[:, None], other=0.0)  # fmt: skip
        acc_k = mm(da_t, qs, DTC) * tl.exp(tl.where(ri[:, None] <= r2, gr2[None, :] - gi, float("-inf")))
    for j in range(BC):  # the diagonal sub-block, one key (for dq) and one query (for dk) at a time
        s = t0 + i * BC + j
        mj = mk & (rk * 0 + s < eos)
        off_j = (s.to(tl.int64) * H + i_h) * K + rk
        kj = tl.load(k + off_j, mask=mj, other=0.0).to(tl.float32)
        qj = tl.load(q + off_j, mask=mj, other=0.0).to(tl.float32)
        gj = tl.load(G + off_j, mask=mj, other=0.0)
        col = tl.load(dA + (ri.to(tl.int64) * H + i_h) * BT + i * BC + j, mask=mi & (rc >= j), other=0.0)
        m_row = (rc <= j) & (rc * 0 + s < eos)
        row = tl.load(dA + (s.to(tl.int64) * H + i_h) * BT + i * BC + rc, mask=m_row, other=0.0)
        acc_q += (
            col[:, None]
            * kj[None, :]
            * tl.exp(tl.where((rc >= j)[:, None] & mi[:, None], gi - gj[None, :], float("-inf")))
        )
        acc_k += row[:, None] * qj[None, :] * tl.exp(tl.where(m_row[:, None], gj[None, :] - gi, float("-inf")))
    return acc_q, acc_k


@triton.jit
def chunk_reverse_cumsum(x):
    """sum_{u >= t} x[u] along dim 0 of a chunk's tile."""
    return tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x


@triton.jit
def chunk_suffix_kernel(x, later, out, chunk_tok, chunk_eos, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr):  # fmt: skip
    """out[t] = later[c] + sum_{u >= t in chunk c} x[u] for x, out [T, H, D] float32 (out may be x) and later
    [NT, H, D]: the decay gradient with the later chunks' share taken from the states (see `dqk_kernel`'s
    LATER). Every chunk at once. Grid (cdiv(D, BD), NT, H)."""
    i_d, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rt = t0 + tl.arange(0, BT)
    rd = i_d * BD + tl.arange(0, BD)
    md = rd < D
    m = (rt < eos)[:, None] & md[None, :]
    off = (rt.to(tl.int64)[:, None] * H + i_h) * D + rd[None, :]
    xt = tl.load(x + off, mask=m, other=0.0)
    carry = tl.load(later + (i_c * H + i_h).to(tl.int64) * D + rd, mask=md, other=0.0)
    tl.store(out + off, chunk_reverse_cumsum(xt) + carry[None, :], mask=m)


@triton.jit
def suffix_sum_kernel(x, carry0, out, cu, seq_chunk, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                      BD: tl.constexpr, HAS_CARRY: tl.constexpr):  # fmt: skip
    """out[t] = carry0[n] + sum_{u >= t in t's sequence n} x[u] for x, out [T, H, D] float32 and carry0 [N, H, D]:
    the decay gradient's suffix sums. Each program walks its sequence's chunks from the last, with the chunk's
    reverse cumsum in registers and the later chunks' total carried. Grid (cdiv(D, BD), N * H)."""
    i_d, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, c0, c1 = sequence_of(cu, seq_chunk, i_nh, H)
    rb = tl.arange(0, BT)
    rd = i_d * BD + tl.arange(0, BD)
    md = rd < D
    if HAS_CARRY:
        carry = tl.load(carry0 + i_nh.to(tl.int64) * D + rd, mask=md, other=0.0)
    else:
        carry = tl.zeros([BD], dtype=tl.float32)
    for j in range(0, c1 - c0):
        rt = bos + (c1 - 1 - j - c0) * BT + rb
        m = (rt < eos)[:, None] & md[None, :]
        off = (rt.to(tl.int64)[:, None] * H + i_h) * D + rd[None, :]
        xt = tl.load(x + off, mask=m, other=0.0)
        tl.store(out + off, chunk_reverse_cumsum(xt) + carry[None, :], mask=m)
        carry += tl.sum(xt, axis=0)
