"""Triton kernels of the chunked linear recurrence, backward pass.

With dS the gradient of the loss with respect to the state leaving a chunk (row convention, see
fwd_kernels.py for the forward terms), the gradient with respect to the state entering it is
  additive  dS_0 = e^{G_C} dS + scale (Q e^G)^T dO
  delta     dU = scale ((Q K^T) * Gamma * M)^T dO + (K e^R) dS,
            dS_0 = e^{G_C} dS + scale (Q e^G)^T dO - W^T dU
(e^{G_C} is a [K] vector for per-key decay). The pass runs backwards through each sequence's chunks and
stores dS for every chunk; everything else in the backward is chunk-local (`chunk_bwd_kernel`, and for
per-key decay `gla_intra_bwd_kernel`). Shape legend as fwd_kernels.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from effarch.ops.linear.triton.fwd_kernels import mm


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
):
    """dhbuf[c] = gradient w.r.t. the state leaving chunk c ([NT, H, K, V] float32); dh0 = gradient w.r.t.
    the initial state; delta rule: dU [T, H, V] float32 (gradient w.r.t. the pseudo-values). Grid
    (cdiv(V, BV), N * H)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n)
    eos = tl.load(cu + i_n + 1)
    c0 = tl.load(seq_chunk + i_n)
    c1 = tl.load(seq_chunk + i_n + 1)
    rb = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    off_kv = rk[:, None] * V + rv[None, :]
    if HAS_DHT:
        dS = tl.load(dhT + i_nh.to(tl.int64) * K * V + off_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, c1 - c0):
        c = c1 - 1 - j
        t0 = bos + (c - c0) * BT
        tl.store(dhbuf + (c * H + i_h).to(tl.int64) * K * V + off_kv, dS, mask=mkv)
        rt = t0 + rb
        mt = rt < eos
        m_tk = mt[:, None] & mk[None, :]
        m_tv = mt[:, None] & mv[None, :]
        off_tk = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
        off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
        qq = tl.load(q + off_tk, mask=m_tk, other=0.0).to(tl.float32)
        dd = tl.load(do + off_tv, mask=m_tv, other=0.0)
        t_last = tl.minimum(t0 + BT, eos) - 1
        if GKIND == 1:
            gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
            gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)  # G at the chunk's last token (0 if empty)
            qs = qq * tl.exp(gt)[:, None]
            decay_last = tl.exp(gl)
        elif GKIND == 2:
            gt = tl.load(G + off_tk, mask=m_tk, other=0.0)
            gl = tl.sum(tl.where((rt == t_last)[:, None], gt, 0.0), axis=0)
            qs = qq * tl.exp(gt)
            decay_last = tl.exp(gl)[:, None]
        else:
            qs = qq
            decay_last = 1.0
        if DELTA:
            kk = tl.load(k + off_tk, mask=m_tk, other=0.0).to(tl.float32)
            causal = rb[:, None] >= rb[None, :]
            p = mm(qq, tl.trans(kk), DTC)
            if GKIND == 1:
                p = p * tl.exp(tl.where(causal, gt[:, None] - gt[None, :], float("-inf")))
                kd = kk * tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
            else:
                kd = kk
            p = tl.where(causal, p, 0.0)
            du = scale * mm(tl.trans(p), dd, DTC) + mm(kd, dS, DTC)
            tl.store(dU + off_tv, du, mask=m_tv)
            # W^T loaded as [K, BT] directly rather than transposed in registers
            wT = tl.load(
                W + (rt.to(tl.int64)[None, :] * H + i_h) * K + rk[:, None], mask=mk[:, None] & mt[None, :], other=0.0
            )
            dS = dS * decay_last + scale * mm(tl.trans(qs), dd, DTC) - mm(wT, du, DTC)
        else:
            dS = dS * decay_last + scale * mm(tl.trans(qs), dd, DTC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + off_kv, dS, mask=mkv)


@triton.jit
def chunk_bwd_kernel(
    q,
    k,
    v,
    G,
    beta,
    X,
    vnew,
    dU,
    hbuf,
    dhbuf,
    do,
    A,
    dq,
    dk,
    dv,
    dbeta,
    dg,
    dA,
    chunk_tok,
    chunk_eos,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    DELTA: tl.constexpr,
    DTC: tl.constexpr,
):
    """Chunk-local gradients, given S_0 = hbuf[c] entering the chunk and dS = dhbuf[c] leaving it. Grid (NT, H).

    With P = scale (Q K^T * Gamma * M) and U = V (additive) or the pseudo-values (delta):
      dq = scale e^G (dO S_0^T) + (dP * scale Gamma M) K,    dP = dO U^T
      dk = e^R (U dS^T) + (dP * scale Gamma M)^T Q,          dv = (K e^R) dS + P^T dO      (additive)
    Delta rule, from U = X diag(b) V - X diag(b e^G) K S_0 and A = strictly-lower(diag(b) (K K^T * Gamma)):
      dW = -dU S_0^T, dX = dW (diag(b e^G) K)^T + dU (diag(b) V)^T, dA = -X^T dX X^T,
      dv = b X^T dU, dk += b e^G X^T dW + (dA b Gamma) K + (dA b Gamma)^T K, dbeta and dg (chunk-local
      reverse cumsum of the gradient w.r.t. G) likewise. Per-key decay leaves the intra-chunk terms of dq
      and dk to `gla_intra_bwd_kernel` and stores dA = scale dP instead.
    """
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
    qq = tl.load(q + off_tk, mask=m_tk, other=0.0)
    kk = tl.load(k + off_tk, mask=m_tk, other=0.0)
    causal = (rb[:, None] >= rb[None, :]) & mt[:, None]
    t_last = tl.minimum(t0 + BT, eos) - 1
    # decay factors: eq = e^G (for Q), ek = e^{G_C - G} (for K), gam = Gamma
    if GKIND == 1:
        gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
        gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)
        eq = tl.exp(gt)[:, None]
        ek = tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
        gam = tl.exp(tl.where(causal, gt[:, None] - gt[None, :], float("-inf")))
    elif GKIND == 2:
        gt = tl.load(G + off_tk, mask=m_tk, other=0.0)
        gl = tl.sum(tl.where((rt == t_last)[:, None], gt, 0.0), axis=0)
        eq = tl.exp(gt)
        ek = tl.exp(tl.where(mt[:, None], gl[None, :] - gt, float("-inf")))
    else:
        eq = 1.0
        ek = 1.0
    if GKIND == 2:
        p = scale * tl.load(A + (rt.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :], mask=causal, other=0.0)
    else:
        p = mm(qq, tl.trans(kk), DTC) * scale
        if GKIND == 1:
            p = p * gam
        p = tl.where(causal, p, 0.0)
    kd = kk.to(tl.float32) * ek
    dq_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dk_acc = tl.zeros([BT, BK], dtype=tl.float32)
    dp = tl.zeros([BT, BT], dtype=tl.float32)
    if DELTA:
        bt = tl.load(beta + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0).to(tl.float32)
        # X^T [BT, BT] loaded transposed: xT[s, t] = X[t, s], zero above the block diagonal of X
        xT = tl.load(X + (rt.to(tl.int64)[None, :] * H + i_h) * BT + rb[:, None],
                     mask=mt[None, :] & (rb[:, None] // BC <= rb[None, :] // BC), other=0.0)  # fmt: skip
        dw = tl.zeros([BT, BK], dtype=tl.float32)
        dxu = tl.zeros([BT, BT], dtype=tl.float32)
        dbeta_acc = tl.zeros([BT], dtype=tl.float32)
        ds_s0 = tl.zeros([BV], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        m_tv = mt[:, None] & mv[None, :]
        off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
        off_kv = (i_c * H + i_h).to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
        # S_0^T and dS^T loaded as [BV, K]
        off_vk = (i_c * H + i_h).to(tl.int64) * K * V + rk[None, :] * V + rv[:, None]
        m_vk = mv[:, None] & mk[None, :]
        s0T = tl.load(hbuf + off_vk, mask=m_vk, other=0.0)
        dsT = tl.load(dhbuf + off_vk, mask=m_vk, other=0.0)
        dd = tl.load(do + off_tv, mask=m_tv, other=0.0)
        if DELTA:
            uu = tl.load(vnew + off_tv, mask=m_tv, other=0.0)
        else:
            uu = tl.load(v + off_tv, mask=m_tv, other=0.0)
        dq_acc += mm(dd, s0T, DTC)
        dk_acc += mm(uu, dsT, DTC)
        dp += mm(dd, tl.trans(uu), DTC)
        if DELTA:
            du = tl.load(dU + off_tv, mask=m_tv, other=0.0)
            vv = tl.load(v + off_tv, mask=m_tv, other=0.0).to(tl.float32)
            dw -= mm(du, s0T, DTC)
            dxu += mm(du, tl.trans(vv * bt[:, None]), DTC)
            dru = mm(xT, du, DTC)  # X^T dU
            tl.store(dv + off_tv, (dru * bt[:, None]).to(dv.dtype.element_ty), mask=m_tv)
            dbeta_acc += tl.sum(dru * vv, axis=1)
            if GKIND == 1:
                s0 = tl.load(hbuf + off_kv, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
                ds = tl.load(dhbuf + off_kv, mask=mk[:, None] & mv[None, :], other=0.0)
                ds_s0 += tl.sum(s0 * ds, axis=0)
        else:
            ds = tl.load(dhbuf + off_kv, mask=mk[:, None] & mv[None, :], other=0.0)
            dvv = mm(kd, ds, DTC) + mm(tl.trans(p), dd, DTC)
            tl.store(dv + off_tv, dvv.to(dv.dtype.element_ty), mask=m_tv)
    dq_in = dq_acc * (scale * eq)
    dk_st = dk_acc * ek
    dp = tl.where(causal, dp, 0.0)
    if GKIND == 2:
        tl.store(dq + off_tk, dq_in.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + off_tk, dk_st.to(dk.dtype.element_ty), mask=m_tk)
        tl.store(dA + (rt.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :], dp * scale, mask=mt[:, None])
    else:
        dsc = dp * scale
        if GKIND == 1:
            dsc = dsc * gam
        dqq = dq_in + mm(dsc, kk, DTC)
        dkk = dk_st + mm(tl.trans(dsc), qq, DTC)
        if DELTA:
            kf = kk.to(tl.float32)
            kg = kf * eq  # e^G K
            rw = kg * bt[:, None]  # diag(b e^G) K
            dx = mm(dw, tl.trans(rw), DTC) + dxu
            drw = mm(xT, dw, DTC)  # X^T dW
            dkk += drw * eq * bt[:, None]
            dbeta_acc += tl.sum(drw * kg, axis=1)
            strict = (rb[:, None] > rb[None, :]) & mt[:, None]
            da = -mm(xT, mm(dx, xT, DTC), DTC)  # -X^T dX X^T
            da = tl.where(strict, da, 0.0)
            kkt = mm(kk, tl.trans(kk), DTC)
            if GKIND == 1:
                kkt = kkt * gam
            kkt = tl.where(strict, kkt, 0.0)
            dbeta_acc += tl.sum(da * kkt, axis=1)
            mmat = da * bt[:, None]
            if GKIND == 1:
                mmat = mmat * gam
            dkk += mm(mmat, kf, DTC) + mm(tl.trans(mmat), kf, DTC)
            tl.store(dbeta + rt.to(tl.int64) * H + i_h, dbeta_acc.to(dbeta.dtype.element_ty), mask=mt)
            if GKIND == 1:
                # gradient w.r.t. the chunk-local cumsum G, then dg = its reverse cumsum within the chunk
                d1 = dp * p  # score decay in P
                d2 = da * kkt * bt[:, None]  # score decay in A
                dG = tl.sum(d1 + d2, axis=1) - tl.sum(d1 + d2, axis=0)
                dG += tl.sum(dq_in * qq.to(tl.float32), axis=1)  # e^G in the inter-chunk output term
                dG += tl.sum(drw * rw, axis=1)  # e^G in diag(b e^G) K
                dkst_k = tl.sum(dk_st * kf, axis=1)  # e^{G_C - G} in the state update
                dG -= dkst_k
                dGl = tl.sum(dkst_k, axis=0) + tl.exp(gl) * tl.sum(ds_s0, axis=0)
                dG += tl.where(rt == t_last, dGl, 0.0)
                dG = tl.where(mt, dG, 0.0)
                dgg = tl.sum(dG, axis=0) - tl.cumsum(dG, axis=0) + dG
                tl.store(dg + rt.to(tl.int64) * H + i_h, dgg, mask=mt)
        tl.store(dq + off_tk, dqq.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dk + off_tk, dkk.to(dk.dtype.element_ty), mask=m_tk)


@triton.jit
def gla_intra_bwd_kernel(
    q,
    k,
    G,
    dA,
    dq,
    dk,
    chunk_tok,
    chunk_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    DTC: tl.constexpr,
):
    """Per-key decay: adds the intra-chunk terms to dq and dk (already holding the inter-chunk ones),
      dq_t += sum_{s<=t} dA_ts k_s e^{G_t - G_s},   dk_s += sum_{t>=s} dA_ts q_t e^{G_t - G_s},
    for the BC rows of sub-block i, with the same splitting of exponents as `gla_intra_kernel`. Grid
    (NT * BT / BC, H)."""
    NB: tl.constexpr = BT // BC
    i_x, i_h = tl.program_id(0), tl.program_id(1)
    i_c = i_x // NB
    i = i_x % NB
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rc = tl.arange(0, BC)
    rb = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    mk = rk < K
    ri = t0 + i * BC + rc
    mi = ri < eos
    m_ik = mi[:, None] & mk[None, :]
    off_i = (ri.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
    gi = tl.load(G + off_i, mask=m_ik, other=0.0)
    rs = t0 + rb
    ms = rs < eos
    off_s = (rs.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
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
        acc_q += col[:, None] * kj[None, :] * tl.exp(tl.where((rc >= j)[:, None], gi - gj[None, :], float("-inf")))
        acc_k += row[:, None] * qj[None, :] * tl.exp(tl.where(m_row[:, None], gj[None, :] - gi, float("-inf")))
    dq_old = tl.load(dq + off_i, mask=m_ik, other=0.0).to(tl.float32)
    dk_old = tl.load(dk + off_i, mask=m_ik, other=0.0).to(tl.float32)
    tl.store(dq + off_i, (dq_old + acc_q).to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + off_i, (dk_old + acc_k).to(dk.dtype.element_ty), mask=m_ik)
