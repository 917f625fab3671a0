"""Triton kernels of the chunked linear recurrence, forward pass.

Chunkwise form ("Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv 2312.06635;
delta rule via the WY/UT transform, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", arXiv 2406.06484, gated as in "Gated Delta Networks", arXiv 2412.06464). Per chunk of C tokens
entering with state S_0, G the chunk-local inclusive cumsum of the log decay, R_t = G_C - G_t:
  additive  O = scale (Q e^G) S_0 + scale ((Q K^T) * Gamma * M) V,   S_C = e^{G_C} S_0 + (K e^R)^T V
  delta     (I + A) [W | U~] = [diag(b e^G) K | diag(b) V],  A = strictly-lower(diag(b) (K K^T * Gamma)),
            U = U~ - W S_0, then as additive with V := U.
Every exponent formed is a difference G_t - G_s with s <= t (or masked to -inf): never exp of a large
positive number.

Shape legend: T tokens of all sequences packed end to end, H heads, K key dim, V value dim, NT chunks,
N sequences, BT = C chunk length, BC sub-block length (16), BK >= K and BV block sizes over K and V.
Token tensors are [T, H, *] contiguous; G is float32 [T, H] (scalar decay) or [T, H, K] (per-key decay).
GKIND: 0 no decay, 1 scalar per token, 2 per key. DTC (dot input type): 0 float32 (exact "ieee"),
1 bfloat16, 2 float16, 3 bfloat16 emulated in float32 (interpreter), 4 tf32 (10-bit mantissa; for 16-bit
inputs when accuracy matters more than speed); accumulation is always float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DTC: tl.constexpr):
    """a @ b with float32 accumulation; operands rounded to the input dtype (exact float32 when DTC = 0)."""
    if DTC == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DTC == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DTC == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DTC == 3:  # bfloat16 rounding, float32 product: the interpreter's bfloat16 dot is wrong
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def operand(x, DTC: tl.constexpr):
    """x rounded as `mm` rounds its operands (a no-op for float32 products): mm(operand(a), b) equals mm(a, b)
    exactly, and a scaled tile kept for a product holds half the registers in a 16-bit dtype."""
    if DTC == 1:
        return x.to(tl.bfloat16)
    elif DTC == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def sequence_of(cu, seq_chunk, i_nh, H: tl.constexpr):
    """Program i_nh = sequence * H + head of a pass over one sequence's chunks: (head, first token, end token,
    first chunk, end chunk)."""
    i_n = i_nh // H
    return i_nh % H, tl.load(cu + i_n), tl.load(cu + i_n + 1), tl.load(seq_chunk + i_n), tl.load(seq_chunk + i_n + 1)


@triton.jit
def chunk_tile(chunk_tok, chunk_eos, i_c, i_h, i_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    """Indices of chunk i_c, head i_h and value block i_v: (first token, end of its sequence, positions in the
    chunk, token indices, token mask, key and value indices and masks, [BT, K] and [BT, BV] masks and offsets
    into the packed [T, H, K] and [T, H, V] tensors)."""
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rb = tl.arange(0, BT)
    rt = t0 + rb
    mt = rt < eos
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    m_tk = mt[:, None] & mk[None, :]
    m_tv = mt[:, None] & mv[None, :]
    off_tk = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
    off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
    return t0, eos, rb, rt, mt, rk, rv, mk, mv, m_tk, m_tv, off_tk, off_tv


@triton.jit
def chunk_cumsum_kernel(
    g,
    G,
    chunk_tok,
    chunk_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PER_KEY: tl.constexpr,
):
    """G = chunk-local inclusive cumsum of g (float32). Grid (NT, H)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rt = t0 + tl.arange(0, BT)
    mt = rt < eos
    if PER_KEY:
        rk = tl.arange(0, BK)
        off = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
        m = mt[:, None] & (rk[None, :] < K)
        x = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
        tl.store(G + off, tl.cumsum(x, axis=0), mask=m)
    else:
        off = rt.to(tl.int64) * H + i_h
        x = tl.load(g + off, mask=mt, other=0.0).to(tl.float32)
        tl.store(G + off, tl.cumsum(x, axis=0), mask=mt)


@triton.jit
def unit_lower_inverse(a, rc, BC: tl.constexpr, DOUBLING: tl.constexpr = False):
    """(I + a)^{-1} of a strictly lower-triangular [BC, BC] float32 block. By forward substitution, row r being
    e_r - a[r, :] X (BC - 1 steps, each two reductions across the block); or, with DOUBLING, from the inverses
    X_s of the diagonal blocks of s rows to those of 2s rows, s = 1, 2, 4, ...: with M the block below the
    diagonal inside each 2s block, X_2s = X_s - X_s M X_s ([[X1, 0], [-X2 M X1, X2]] per block), log2(BC) steps
    of two small float32 products."""
    x = (rc[:, None] == rc[None, :]).to(tl.float32)
    if DOUBLING:
        for lvl in tl.static_range(8):
            if (1 << lvl) < BC:
                inside = (rc[:, None] >> (lvl + 1)) == (rc[None, :] >> (lvl + 1))
                m = tl.where(inside & ((rc[:, None] >> lvl) != (rc[None, :] >> lvl)), a, 0.0)
                x = x - ieee(x, ieee(m, x))
    else:
        for r in range(1, BC):
            a_r = tl.sum(tl.where(rc[:, None] == r, a, 0.0), axis=0)  # row r of a, indexed by column
            x = tl.where(rc[:, None] == r, x - tl.sum(a_r[:, None] * x, axis=0)[None, :], x)
    return x


@triton.jit
def key_block(k, beta, G, t0, eos, i, i_h, rc, rk, mk, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
              HAS_G: tl.constexpr):  # fmt: skip
    """Sub-block i of a chunk: its keys [BC, BK], beta and (with HAS_G) log-decay cumsum, token indices, mask."""
    ri = t0 + i * BC + rc
    mi = ri < eos
    ki = tl.load(k + (ri.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
    bi = tl.load(beta + ri.to(tl.int64) * H + i_h, mask=mi, other=0.0).to(tl.float32)
    gi = bi
    if HAS_G:
        gi = tl.load(G + ri.to(tl.int64) * H + i_h, mask=mi, other=0.0)
    return ki, bi, gi, ri, mi


@triton.jit
def kkt_block(ki, kj, bi, gi, gj, strict, DIAG: tl.constexpr, HAS_G: tl.constexpr, DTC: tl.constexpr):
    """Block (i, j) of A = strictly-lower(diag(b) (K K^T * Gamma)): the diagonal block masked to its strict lower
    part; below the diagonal every token of block j precedes every token of block i (exponents <= 0)."""
    a = mm(ki, tl.trans(kj), DTC)
    if HAS_G:
        if DIAG:
            a = a * tl.exp(tl.where(strict, gi[:, None] - gj[None, :], float("-inf")))
        else:
            a = a * tl.exp(gi[:, None] - gj[None, :])
    a = a * bi[:, None]
    if DIAG:
        a = tl.where(strict, a, 0.0)
    return a


@triton.jit
def ieee(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def delta_prep_kernel(
    k,
    v,
    beta,
    G,
    X,
    W,
    U,
    chunk_tok,
    chunk_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_G: tl.constexpr,
    HAVE_X: tl.constexpr,
    DTC: tl.constexpr,
    IN_REGS: tl.constexpr = False,
    DOUBLING: tl.constexpr = False,
):
    """X = (I + A)^{-1} [T, H, BT] (row t holds its chunk's row, float32; blocks above the diagonal are not
    written), W = X diag(b e^G) K [T, H, K] and U~ = X diag(b) V [T, H, V]. Grid (NT, H). With HAVE_X, X is read
    (saved by the forward) and only W and U~ are formed.

    The unit-lower-triangular inverse is built by blocks of BC rows: each diagonal block by forward
    substitution, then X_ij = -X_ii sum_{j<=m<i} A_im X_mj, block row by block row through X in memory; or
    with IN_REGS (BT = 4 BC only) every block of A and X in registers, X written once.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    NB: tl.constexpr = BT // BC
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    mk = rk < K
    strict = rc[:, None] > rc[None, :]
    rb = tl.arange(0, BT)
    if not HAVE_X and IN_REGS:
        tl.static_assert(NB == 4, "IN_REGS needs BT = 4 BC")
        k0, b0, g0, r0, m0 = key_block(k, beta, G, t0, eos, 0, i_h, rc, rk, mk, H, K, BC, HAS_G)
        k1, b1, g1, r1, m1 = key_block(k, beta, G, t0, eos, 1, i_h, rc, rk, mk, H, K, BC, HAS_G)
        k2, b2, g2, r2, m2 = key_block(k, beta, G, t0, eos, 2, i_h, rc, rk, mk, H, K, BC, HAS_G)
        k3, b3, g3, r3, m3 = key_block(k, beta, G, t0, eos, 3, i_h, rc, rk, mk, H, K, BC, HAS_G)
        x00 = unit_lower_inverse(kkt_block(k0, k0, b0, g0, g0, strict, True, HAS_G, DTC), rc, BC, DOUBLING)
        x11 = unit_lower_inverse(kkt_block(k1, k1, b1, g1, g1, strict, True, HAS_G, DTC), rc, BC, DOUBLING)
        x22 = unit_lower_inverse(kkt_block(k2, k2, b2, g2, g2, strict, True, HAS_G, DTC), rc, BC, DOUBLING)
        x33 = unit_lower_inverse(kkt_block(k3, k3, b3, g3, g3, strict, True, HAS_G, DTC), rc, BC, DOUBLING)
        a10 = kkt_block(k1, k0, b1, g1, g0, strict, False, HAS_G, DTC)
        a21 = kkt_block(k2, k1, b2, g2, g1, strict, False, HAS_G, DTC)
        a32 = kkt_block(k3, k2, b3, g3, g2, strict, False, HAS_G, DTC)
        x10 = -ieee(x11, ieee(a10, x00))
        x21 = -ieee(x22, ieee(a21, x11))
        x32 = -ieee(x33, ieee(a32, x22))
        a20 = kkt_block(k2, k0, b2, g2, g0, strict, False, HAS_G, DTC)
        x20 = -ieee(x22, ieee(a20, x00) + ieee(a21, x10))
        a31 = kkt_block(k3, k1, b3, g3, g1, strict, False, HAS_G, DTC)
        x31 = -ieee(x33, ieee(a31, x11) + ieee(a32, x21))
        a30 = kkt_block(k3, k0, b3, g3, g0, strict, False, HAS_G, DTC)
        x30 = -ieee(x33, ieee(a30, x00) + ieee(a31, x10) + ieee(a32, x20))
        row0 = X + (r0.to(tl.int64)[:, None] * H + i_h) * BT + rc[None, :]
        row1 = X + (r1.to(tl.int64)[:, None] * H + i_h) * BT + rc[None, :]
        row2 = X + (r2.to(tl.int64)[:, None] * H + i_h) * BT + rc[None, :]
        row3 = X + (r3.to(tl.int64)[:, None] * H + i_h) * BT + rc[None, :]
        tl.store(row0, x00, mask=m0[:, None])
        tl.store(row1, x10, mask=m1[:, None])
        tl.store(row1 + BC, x11, mask=m1[:, None])
        tl.store(row2, x20, mask=m2[:, None])
        tl.store(row2 + BC, x21, mask=m2[:, None])
        tl.store(row2 + 2 * BC, x22, mask=m2[:, None])
        tl.store(row3, x30, mask=m3[:, None])
        tl.store(row3 + BC, x31, mask=m3[:, None])
        tl.store(row3 + 2 * BC, x32, mask=m3[:, None])
        tl.store(row3 + 3 * BC, x33, mask=m3[:, None])
        tl.debug_barrier()
    elif not HAVE_X:
        # Diagonal blocks: X_ii = (I + A_ii)^{-1} by forward substitution.
        for i in tl.static_range(NB):
            ki, bi, gi, ri, mi = key_block(k, beta, G, t0, eos, i, i_h, rc, rk, mk, H, K, BC, HAS_G)
            x = unit_lower_inverse(kkt_block(ki, ki, bi, gi, gi, strict, True, HAS_G, DTC), rc, BC, DOUBLING)
            tl.store(X + (ri.to(tl.int64)[:, None] * H + i_h) * BT + i * BC + rc[None, :], x, mask=mi[:, None])
        tl.debug_barrier()
        # Off-diagonal blocks, one block row at a time (rows m < i are final in memory before row i reads them).
        for i in tl.static_range(1, NB):
            ki, bi, gi, ri, mi = key_block(k, beta, G, t0, eos, i, i_h, rc, rk, mk, H, K, BC, HAS_G)
            acc = tl.zeros([BC, BT], dtype=tl.float32)
            for m in tl.static_range(i):
                km, bm, gm, rm, mm_ = key_block(k, beta, G, t0, eos, m, i_h, rc, rk, mk, H, K, BC, HAS_G)
                a = kkt_block(ki, km, bi, gi, gm, strict, False, HAS_G, DTC)
                # row block m of X, columns before block m+1 (the rest is zero)
                xm = tl.load(
                    X + (rm.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :],
                    mask=mm_[:, None] & (rb[None, :] < (m + 1) * BC),
                    other=0.0,
                )
                acc += ieee(a, xm)
            xii = tl.load(
                X + (ri.to(tl.int64)[:, None] * H + i_h) * BT + i * BC + rc[None, :], mask=mi[:, None], other=0.0
            )
            xi = -ieee(xii, acc)
            tl.store(
                X + (ri.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :],
                xi,
                mask=mi[:, None] & (rb[None, :] < i * BC),
            )
            tl.debug_barrier()
    # W and U~ from the whole inverse.
    rt = t0 + rb
    mt = rt < eos
    xf = tl.load(
        X + (rt.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :],
        mask=mt[:, None] & (rb[None, :] // BC <= rb[:, None] // BC),
        other=0.0,
    )
    bt = tl.load(beta + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0).to(tl.float32)
    if HAS_G:
        gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
        bk = bt * tl.exp(gt)
    else:
        bk = bt
    # in column blocks of BV, W's as U's: a whole [BT, K] float32 operand and product spilled registers on sm_90
    for i_k in range(0, tl.cdiv(K, BV)):
        rkw = i_k * BV + tl.arange(0, BV)
        m_tkw = mt[:, None] & (rkw < K)[None, :]
        off_tkw = (rt.to(tl.int64)[:, None] * H + i_h) * K + rkw[None, :]
        kf = tl.load(k + off_tkw, mask=m_tkw, other=0.0).to(tl.float32)
        tl.store(W + off_tkw, mm(xf, kf * bk[:, None], DTC).to(W.dtype.element_ty), mask=m_tkw)
    for i_v in range(0, tl.cdiv(V, BV)):
        rv = i_v * BV + tl.arange(0, BV)
        mv = rv < V
        vv = tl.load(
            v + (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0
        ).to(tl.float32)
        u = mm(xf, vv * bt[:, None], DTC)
        tl.store(
            U + (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :],
            u.to(U.dtype.element_ty),
            mask=mt[:, None] & mv[None, :],
        )


@triton.jit
def gla_intra_kernel(
    q,
    k,
    G,
    A,
    chunk_tok,
    chunk_eos,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BKI: tl.constexpr,
    DTC: tl.constexpr,
    SPREAD: tl.constexpr = 40.0,
):
    """Per-key decay: A[t, s] = sum_c q_tc k_sc exp(G_tc - G_sc) for s <= t in the chunk, else 0; float32
    [T, H, BT]. Grid (NT * BT / BC, H): one program per query sub-block i of BC rows.

    When the decay inside sub-block i spans at most SPREAD in log space on every key of a block of BKI keys
    (G_m - G_l <= SPREAD, m its first token and l its last), that block's keys up to l are taken in one
    [BC, BKI] x [BKI, BT] product split at m: exp(G_t - G_s) = exp(G_t - G_m) exp(G_m - G_s), the first factor <= 1 and the second <= e^SPREAD, so
    nothing overflows. Otherwise keys before sub-block i are split at r, the token just before it (both
    exponents <= 0), and keys inside it take exponent differences formed directly, one key column at a time.
    """
    NB: tl.constexpr = BT // BC
    i_x, i_h = tl.program_id(0), tl.program_id(1)
    i_c = i_x // NB
    i = i_x % NB
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rc = tl.arange(0, BC)
    rb = tl.arange(0, BT)
    ri = t0 + i * BC + rc
    mi = ri < eos
    m0 = t0 + i * BC
    l0 = tl.minimum(m0 + BC, eos) - 1
    acc = tl.zeros([BC, BT], dtype=tl.float32)
    # The keys in blocks of BKI, each taking its form by its own spread: the sum over keys splits, and whole-K
    # float32 tiles spilled registers on sm_90.
    for i_k in tl.static_range(0, (K + BKI - 1) // BKI):
        rk = i_k * BKI + tl.arange(0, BKI)
        mk = rk < K
        off_i = (ri.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
        qi = tl.load(q + off_i, mask=mi[:, None] & mk[None, :], other=0.0).to(tl.float32)
        gi = tl.load(G + off_i, mask=mi[:, None] & mk[None, :], other=0.0)
        gm = tl.load(G + (m0.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + m0 < eos), other=0.0)
        gl = tl.load(G + (l0.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + l0 >= m0), other=0.0)
        if tl.max(gm - gl, axis=0) <= SPREAD:
            rs = t0 + rb
            ms = (rb < (i + 1) * BC) & (rs < eos) & (rb * 0 + m0 < eos)  # none past the end (G_m read as 0)
            off_s = (rs.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
            ks = tl.load(k + off_s, mask=ms[:, None] & mk[None, :], other=0.0).to(tl.float32)
            gs = tl.load(G + off_s, mask=ms[:, None] & mk[None, :], other=0.0)
            ks = ks * tl.exp(tl.where(ms[:, None], gm[None, :] - gs, float("-inf")))
            qm = qi * tl.exp(tl.where(mi[:, None], gi - gm[None, :], float("-inf")))
            acc += tl.where(rb[None, :] <= i * BC + rc[:, None], mm(qm, tl.trans(ks), DTC), 0.0)
        else:
            acc += _gla_intra_by_columns(q, k, G, qi, gi, t0, eos, i, i_h, rc, rb, rk, mk, H, K, BT, BC, BKI, DTC)
    tl.store(A + (ri.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :], acc, mask=mi[:, None])


@triton.jit
def _gla_intra_by_columns(q, k, G, qi, gi, t0, eos, i, i_h, rc, rb, rk, mk, H: tl.constexpr, K: tl.constexpr,
                          BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, DTC: tl.constexpr):  # fmt: skip
    """`gla_intra_kernel`'s rows of sub-block i when its decay spread is too large for one product. Rows past the
    sequence's end (G read as 0 there) are masked inside the exponents too, so no exp overflows on them."""
    acc = tl.zeros([BC, BT], dtype=tl.float32)
    mi = t0 + i * BC + rc < eos
    if i > 0:
        r = t0 + i * BC - 1
        gr = tl.load(G + (r.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + r < eos), other=0.0)
        rs = t0 + rb
        ms = (rb < i * BC) & (rs < eos)
        off_s = (rs.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
        ks = tl.load(k + off_s, mask=ms[:, None] & mk[None, :], other=0.0).to(tl.float32)
        gs = tl.load(G + off_s, mask=ms[:, None] & mk[None, :], other=0.0)
        ks = ks * tl.exp(tl.where(ms[:, None], gr[None, :] - gs, float("-inf")))
        acc = mm(qi * tl.exp(tl.where(mi[:, None], gi - gr[None, :], float("-inf"))), tl.trans(ks), DTC)
    for j in range(BC):
        s = t0 + i * BC + j
        off_j = (s.to(tl.int64) * H + i_h) * K + rk
        mj = mk & (rk * 0 + s < eos)  # vector mask: the interpreter rejects scalar ones
        kj = tl.load(k + off_j, mask=mj, other=0.0).to(tl.float32)
        gj = tl.load(G + off_j, mask=mj, other=0.0)
        e = tl.exp(tl.where((rc[:, None] >= j) & mi[:, None], gi - gj[None, :], float("-inf")))
        col = tl.sum(qi * kj[None, :] * e, axis=1)
        acc = tl.where(rb[None, :] == i * BC + j, col[:, None], acc)
    return acc


@triton.jit
def last_log_decay(G, t0, t_last, i_h, rk, mk, H: tl.constexpr, K: tl.constexpr, GKIND: tl.constexpr):
    """G at a chunk's last token t_last, 0 for an empty chunk (t_last < t0): a scalar for GKIND 1, [BK] for 2."""
    if GKIND == 1:
        return tl.load(G + t_last.to(tl.int64) * H + i_h, mask=t_last >= t0, other=0.0)
    else:
        return tl.load(G + (t_last.to(tl.int64) * H + i_h) * K + rk, mask=mk & (rk * 0 + t_last >= t0), other=0.0)


@triton.jit
def chunk_outer_kernel(
    a,
    b,
    G,
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
    NKB: tl.constexpr,
    GKIND: tl.constexpr,
    REVERSE: tl.constexpr,
    DTC: tl.constexpr,
):
    """Each chunk's own term of the state passes, for every chunk at once (the first phase of the two-phase
    passes; the sequential pass then only decays and adds, as the state passing of "Transformers are SSMs",
    arXiv 2405.21060): out[c] = (A e^R)^T B with R_t = G_C - G_t, the chunk's contribution to the state leaving
    it (A = K, B = V); with REVERSE, out[c] = scale (A e^G)^T B, its contribution to the gradient of the state
    entering it (A = Q, B = dO). out [NT, H, K, V] float32. Grid (NT, cdiv(K, BK) * cdiv(V, BV), H)."""
    i_c, i_kv, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k = i_kv % NKB
    i_v = i_kv // NKB
    t0 = tl.load(chunk_tok + i_c)
    eos = tl.load(chunk_eos + i_c)
    rt = t0 + tl.arange(0, BT)
    mt = rt < eos
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    m_kt = mk[:, None] & mt[None, :]
    off_kt = (rt.to(tl.int64)[None, :] * H + i_h) * K + rk[:, None]  # A^T loaded as [BK, BT]
    aT = tl.load(a + off_kt, mask=m_kt, other=0.0)
    bb = tl.load(b + (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
    t_last = tl.minimum(t0 + BT, eos) - 1
    if GKIND == 1:
        gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
        if REVERSE:  # the tokens' decay on B's [BT, BV] tile
            bb = bb.to(tl.float32) * tl.exp(gt)[:, None]
        else:
            gl = last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND)
            bb = bb.to(tl.float32) * tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
    elif GKIND == 2:
        gt = tl.load(G + off_kt, mask=m_kt, other=0.0)
        if REVERSE:
            aT = aT.to(tl.float32) * tl.exp(gt)
        else:
            gl = last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND)
            aT = aT.to(tl.float32) * tl.exp(tl.where(mt[None, :], gl[:, None] - gt, float("-inf")))
    acc = mm(aT, bb, DTC)
    if REVERSE:
        acc = acc * scale
    tl.store(out + (i_c.to(tl.int64) * H + i_h) * K * V + rk[:, None] * V + rv[None, :], acc,
             mask=mk[:, None] & mv[None, :])  # fmt: skip


@triton.jit
def state_fwd_kernel(
    k,
    v,
    W,
    U,
    G,
    hbuf,
    h0,
    hT,
    vnew,
    D,
    cu,
    seq_chunk,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GKIND: tl.constexpr,
    DELTA: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    DTC: tl.constexpr,
    PRE: tl.constexpr = False,
):
    """Inter-chunk state pass, one sequence and head and a BK x BV block of the state per program (the delta
    rule needs all K rows in one program: BK >= K; the additive rule's rows are independent): hbuf[c] = state entering
    chunk c ([NT, H, K, V]); delta rule: vnew = U~ - W S_0 [T, H, V] (the pseudo-values U). With PRE (additive
    rule) each chunk's own term is read from D [NT, H, K, V] float32 (`chunk_outer_kernel`; D may be hbuf itself,
    as slot c is read before S is written there) and the pass only decays and adds. Grid
    (cdiv(V, BV), cdiv(K, BK), N * H)."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, bos, eos, c0, c1 = sequence_of(cu, seq_chunk, i_nh, H)
    rk = i_k * BK + tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk = rk < K
    mv = rv < V
    mkv = mk[:, None] & mv[None, :]
    off_kv = rk[:, None] * V + rv[None, :]
    if HAS_H0:
        S = tl.load(h0 + i_nh.to(tl.int64) * K * V + off_kv, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    if PRE:  # the next chunk's term is loaded one iteration ahead, so its load overlaps the current update
        nxt = tl.load(D + (c0 * H + i_h).to(tl.int64) * K * V + off_kv, mask=mkv & (off_kv * 0 + c0 < c1), other=0.0)
    for c in range(c0, c1):
        t0 = bos + (c - c0) * BT
        if PRE:
            own = nxt
            nxt = tl.load(
                D + ((c + 1) * H + i_h).to(tl.int64) * K * V + off_kv, mask=mkv & (off_kv * 0 + c + 1 < c1), other=0.0
            )
        tl.store(hbuf + (c * H + i_h).to(tl.int64) * K * V + off_kv, S.to(hbuf.dtype.element_ty), mask=mkv)
        if PRE:
            t_last = tl.minimum(t0 + BT, eos) - 1
            if GKIND == 1:
                S = S * tl.exp(last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND))
            elif GKIND == 2:
                S = S * tl.exp(last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND))[:, None]
            S += own
        else:
            rt = t0 + tl.arange(0, BT)
            mt = rt < eos
            m_tk = mt[:, None] & mk[None, :]
            m_tv = mt[:, None] & mv[None, :]
            off_tk = (rt.to(tl.int64)[:, None] * H + i_h) * K + rk[None, :]
            off_tv = (rt.to(tl.int64)[:, None] * H + i_h) * V + rv[None, :]
            kk = tl.load(k + off_tk, mask=m_tk, other=0.0)
            if DELTA:
                w = tl.load(W + off_tk, mask=m_tk, other=0.0)
                u = tl.load(U + off_tv, mask=m_tv, other=0.0).to(tl.float32)
                vv = u - mm(w, S, DTC)
                tl.store(vnew + off_tv, vv.to(vnew.dtype.element_ty), mask=m_tv)
            else:
                vv = tl.load(v + off_tv, mask=m_tv, other=0.0)
            t_last = tl.minimum(t0 + BT, eos) - 1
            if GKIND == 1:
                gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
                gl = tl.sum(tl.where(rt == t_last, gt, 0.0), axis=0)  # G at the chunk's last token (0 if empty)
                # the tokens' decay on V's [BT, BV] tile rather than a float32 copy of K
                vd = vv.to(tl.float32) * tl.exp(tl.where(mt, gl - gt, float("-inf")))[:, None]
                S = S * tl.exp(gl) + mm(tl.trans(kk), vd, DTC)
            elif GKIND == 2:
                gt = tl.load(G + off_tk, mask=m_tk, other=0.0)
                gl = last_log_decay(G, t0, t_last, i_h, rk, mk, H, K, GKIND)
                kd = kk.to(tl.float32) * tl.exp(tl.where(mt[:, None], gl[None, :] - gt, float("-inf")))
                S = S * tl.exp(gl)[:, None] + mm(tl.trans(kd), vv, DTC)
            else:
                S = S + mm(tl.trans(kk), vv, DTC)
    if STORE_HT:
        tl.store(hT + i_nh.to(tl.int64) * K * V + off_kv, S, mask=mkv)


@triton.jit
def out_fwd_kernel(
    q,
    k,
    v,
    G,
    A,
    hbuf,
    o,
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
    DTC: tl.constexpr,
):
    """o = scale (Q e^G) S_0 + scale (masked decayed Q K^T) V for one chunk, head and BV columns; v is the
    pseudo-value U for the delta rule; A holds the intra-chunk scores for per-key decay. Grid
    (cdiv(V, BV), NT, H)."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos, rb, rt, mt, rk, rv, mk, mv, m_tk, m_tv, off_tk, off_tv = chunk_tile(
        chunk_tok, chunk_eos, i_c, i_h, i_v, H, K, V, BT, BK, BV
    )
    qq = tl.load(q + off_tk, mask=m_tk, other=0.0)
    S0 = tl.load(
        hbuf + (i_c.to(tl.int64) * H + i_h) * K * V + rk[:, None] * V + rv[None, :],
        mask=mk[:, None] & mv[None, :],
        other=0.0,
    )
    causal = rb[:, None] >= rb[None, :]
    if GKIND == 2:
        gt = tl.load(G + off_tk, mask=m_tk, other=0.0)
        acc = mm(qq.to(tl.float32) * tl.exp(gt), S0, DTC)
        a = tl.load(A + (rt.to(tl.int64)[:, None] * H + i_h) * BT + rb[None, :], mask=mt[:, None] & causal, other=0.0)
    else:
        kk = tl.load(k + off_tk, mask=m_tk, other=0.0)
        a = mm(qq, tl.trans(kk), DTC)
        if GKIND == 1:  # (Q e^G) S_0 = e^G (Q S_0) for a scalar decay: no float32 copy of Q
            gt = tl.load(G + rt.to(tl.int64) * H + i_h, mask=mt, other=0.0)
            acc = mm(qq, S0, DTC) * tl.exp(gt)[:, None]
            a = a * tl.exp(tl.where(causal, gt[:, None] - gt[None, :], float("-inf")))
        else:
            acc = mm(qq, S0, DTC)
        a = tl.where(causal, a, 0.0)
    vv = tl.load(v + off_tv, mask=m_tv, other=0.0)
    acc += mm(a, vv, DTC)
    tl.store(o + off_tv, (acc * scale).to(o.dtype.element_ty), mask=m_tv)
