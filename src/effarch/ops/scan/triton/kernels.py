"""Triton kernels of the selective scan (Mamba's S6), forward and backward, one sequence walked token by token.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), per channel d, state n:
  u_t = dt_t + dt_bias,  s_t = softplus(u_t) (or u_t),  a_t = exp(s_t A),
  h_t = a_t h_{t-1} + s_t x_t B_t,   y_t = (C_t . h_t + D x_t) * silu(z_t)   (skip and gate when given).
A program owns BD channels of one group of one sequence and keeps their float32 state h [BD, BN] in
registers; the state never goes to memory except at chunk starts (every CHUNK tokens, for the backward)
and at the end. The next token's inputs are loaded before the current token is computed, so their memory
latency overlaps that token's arithmetic.

The backward walks the chunks of its sequence in reverse. For each chunk it recomputes the chunk's states
forward from the saved chunk-start state into a per-program scratch slab [CHUNK, BD, BN] float32, then walks
the chunk backward reading h_{t-1} from the slab. Why a slab rather than recomputation: the reverse walk
needs every state of the chunk in reverse order, and registers cannot be indexed by token; recomputing each
h_{t-1} from the chunk start would cost CHUNK / 2 times the forward's work. The slab is written once and read
once per token, right after, so it is served by L2 when all programs' slabs (CHUNK x N x 4 bytes per
channel) fit in it, which is how the host picks CHUNK; a backward program walks several sequences when
there are many, reusing its slab. States are never recovered by dividing by a_t (a_t underflows to 0 for
long steps and strong decay).
  dh_t = a_{t+1} dh_{t+1} + dyp_t C_t          (dyp = dy * silu(z), the gradient of C.h + D x)
  dC_t = sum_d dyp_t h_t      dB_t = sum_d dh_t s_t x_t      dx_t = s_t (dh_t . B_t) + D dyp_t
  ds_t = sum_n dh_t (A a_t h_{t-1} + x_t B_t)  dA += dh_t s_t a_t h_{t-1}   du_t = ds_t sigmoid(u_t)
Reductions over channels (dB, dC) are written per channel block and summed on the host, and those over
tokens (dA, dD, dt_bias) per sequence: no atomics, so the gradients are deterministic.

Small helpers (softplus, sigmoid) are written out inline: under the Triton interpreter (CPU tests) every
call of a jitted function costs milliseconds, once per token.
Masks combining a vector with a scalar condition use tl.where(ok, mask, False): the interpreter mistypes
`mask & ok`.

Shape legend: T tokens of all sequences packed end to end, NS sequences (cu [NS+1] int64 token offsets),
D channels, G groups of B/C, DG = D / G channels per group, NB = cdiv(DG, BD) channel blocks per group (a
block never straddles two groups, so B_t and C_t are one [BN] row per program), N state size, BN >= N
(power of two), NC chunk-start states (seq_chunk [NS] first chunk of each sequence).
Token tensors are contiguous: x, dt, z, y [T, D]; B, C [T, G, N]. A [D, N], D, dt_bias [D] float32;
states float32 [NS or NC, D, N].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def scan_fwd_kernel(
    x,
    dt,
    A,
    Bm,
    Cm,
    Dk,
    z,
    dt_bias,
    h0,
    y,
    hT,
    hc,
    cu,
    seq_chunk,
    D: tl.constexpr,
    N: tl.constexpr,
    G: tl.constexpr,
    DG: tl.constexpr,
    NB: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    CHUNK: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    SAVE_CHUNKS: tl.constexpr,
):
    """Grid (NS, G * NB). Writes y [T, D], the final states hT [NS, D, N] (STORE_FINAL) and the state
    entering each chunk, hc [NC, D, N] (SAVE_CHUNKS)."""
    i_s, i_gb = tl.program_id(0), tl.program_id(1)
    i_g = i_gb // NB
    rdl = (i_gb % NB) * BD + tl.arange(0, BD)  # channel within the group
    md = rdl < DG
    rd = i_g * DG + rdl
    rn = tl.arange(0, BN)
    mn = rn < N
    mdn = md[:, None] & mn[None, :]
    off_dn = rd[:, None] * N + rn[None, :]
    Am = tl.load(A + off_dn, mask=mdn, other=0.0)  # [BD, BN] float32
    if HAS_D:
        Dv = tl.load(Dk + rd, mask=md, other=0.0)
    if HAS_BIAS:
        bias = tl.load(dt_bias + rd, mask=md, other=0.0)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    bos = tl.load(cu + i_s).to(tl.int64)
    eos = tl.load(cu + i_s + 1).to(tl.int64)
    off_state = i_s.to(tl.int64) * D * N + off_dn
    if HAS_H0:
        h = tl.load(h0 + off_state, mask=mdn, other=0.0)
    else:
        h = tl.zeros([BD, BN], dtype=tl.float32)
    if SAVE_CHUNKS:
        c0 = tl.load(seq_chunk + i_s).to(tl.int64)
    # token bos's inputs; x, u = dt + dt_bias, z [BD], B, C [BN]
    ok = bos < eos
    m_d, m_n = tl.where(ok, md, False), tl.where(ok, mn, False)
    xt = tl.load(x + bos * D + rd, mask=m_d, other=0.0).to(tl.float32)
    ut = tl.load(dt + bos * D + rd, mask=m_d, other=0.0).to(tl.float32) + bias
    zt = tl.load(z + bos * D + rd, mask=m_d, other=0.0).to(tl.float32) if HAS_Z else xt
    Bt = tl.load(Bm + (bos * G + i_g) * N + rn, mask=m_n, other=0.0).to(tl.float32)
    Ct = tl.load(Cm + (bos * G + i_g) * N + rn, mask=m_n, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        if SAVE_CHUNKS:
            if (t - bos) % CHUNK == 0:
                tl.store(hc + (c0 + (t - bos) // CHUNK) * D * N + off_dn, h, mask=mdn)
        # token t + 1's loads go out before token t's arithmetic
        tn = t + 1
        ok = tn < eos
        m_d, m_n = tl.where(ok, md, False), tl.where(ok, mn, False)
        xn = tl.load(x + tn * D + rd, mask=m_d, other=0.0).to(tl.float32)
        un = tl.load(dt + tn * D + rd, mask=m_d, other=0.0).to(tl.float32) + bias
        zn = tl.load(z + tn * D + rd, mask=m_d, other=0.0).to(tl.float32) if HAS_Z else xn
        Bn = tl.load(Bm + (tn * G + i_g) * N + rn, mask=m_n, other=0.0).to(tl.float32)
        Cn = tl.load(Cm + (tn * G + i_g) * N + rn, mask=m_n, other=0.0).to(tl.float32)

        if SOFTPLUS:  # max(u, 0) + log1p(e^-|u|), log1p by Goldberg's correction (exact where 1 + e rounds to 1)
            e = tl.exp(-tl.abs(ut))
            w = 1.0 + e
            wm = w - 1.0
            s = tl.maximum(ut, 0.0) + tl.where(wm == 0.0, e, tl.log(w) * (e / tl.where(wm == 0.0, 1.0, wm)))
        else:
            s = ut
        h = tl.exp(s[:, None] * Am) * h + (s * xt)[:, None] * Bt[None, :]
        yt = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            yt += Dv * xt
        if HAS_Z:
            yt = yt * zt / (1.0 + tl.exp(-zt))
        tl.store(y + t * D + rd, yt.to(y.dtype.element_ty), mask=md)
        xt, ut, zt, Bt, Ct = xn, un, zn, Bn, Cn
    if STORE_FINAL:
        tl.store(hT + off_state, h, mask=mdn)


@triton.jit
def scan_bwd_kernel(
    x,
    dt,
    A,
    Bm,
    Cm,
    Dk,
    z,
    dt_bias,
    hc,
    dy,
    dhT,
    dx,
    ddt,
    dz,
    dB,
    dC,
    dA,
    dD,
    dbias,
    dh0,
    scratch,
    cu,
    seq_chunk,
    T,
    NS,
    D: tl.constexpr,
    N: tl.constexpr,
    G: tl.constexpr,
    DG: tl.constexpr,
    NB: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    CHUNK: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DHT: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    """Grid (R, G * NB) with R <= NS: program row r walks sequences r, r + R, ... (so the scratch, one slab per
    program, stays bounded however many sequences are packed). Writes dx, ddt (w.r.t. the raw dt), dz [T, D]
    in the inputs' dtypes; float32 partials dB, dC [NB, T, G, N] (per channel block), dA [NS, D, N], dD,
    dbias [NS, D] (per sequence); dh0 [NS, D, N]. scratch [R * G * NB, CHUNK, BD, BN] float32."""
    i_r, i_gb = tl.program_id(0), tl.program_id(1)
    i_g = i_gb // NB
    i_b = i_gb % NB
    rdl = i_b * BD + tl.arange(0, BD)
    md = rdl < DG
    rd = i_g * DG + rdl
    rn = tl.arange(0, BN)
    mn = rn < N
    mdn = md[:, None] & mn[None, :]
    off_dn = rd[:, None] * N + rn[None, :]
    Am = tl.load(A + off_dn, mask=mdn, other=0.0)
    if HAS_D:
        Dv = tl.load(Dk + rd, mask=md, other=0.0)
    if HAS_BIAS:
        bias = tl.load(dt_bias + rd, mask=md, other=0.0)
    else:
        bias = tl.zeros([BD], dtype=tl.float32)
    off_bc = (i_b.to(tl.int64) * T * G + i_g) * N + rn  # + t * G * N: token t's row of the dB, dC partials
    # this program's slab; every element is written before it is read, masked lanes included
    slab = scratch + (i_r.to(tl.int64) * G * NB + i_gb) * CHUNK * BD * BN
    off_slab = tl.arange(0, BD)[:, None] * BN + rn[None, :]
    for i_s in range(i_r, NS, tl.num_programs(0)):
        bos = tl.load(cu + i_s).to(tl.int64)
        eos = tl.load(cu + i_s + 1).to(tl.int64)
        c0 = tl.load(seq_chunk + i_s).to(tl.int64)
        off_state = tl.cast(i_s, tl.int64) * D * N + off_dn
        if HAS_DHT:
            dh = tl.load(dhT + off_state, mask=mdn, other=0.0)
        else:
            dh = tl.zeros([BD, BN], dtype=tl.float32)
        dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
        dD_acc = tl.zeros([BD], dtype=tl.float32)
        dbias_acc = tl.zeros([BD], dtype=tl.float32)
        n_chunks = (eos - bos + CHUNK - 1) // CHUNK
        for ci in range(0, n_chunks):
            c = n_chunks - 1 - ci
            ts = bos + c * CHUNK
            te = tl.minimum(ts + CHUNK, eos)
            h = tl.load(hc + (c0 + c) * D * N + off_dn, mask=mdn, other=0.0)
            tl.debug_barrier()  # the previous chunk's reads of the slab are done before it is overwritten

            # 1. the chunk's states forward: slab[i] = the state entering token ts + i
            xt = tl.load(x + ts * D + rd, mask=md, other=0.0).to(tl.float32)
            ut = tl.load(dt + ts * D + rd, mask=md, other=0.0).to(tl.float32) + bias
            Bt = tl.load(Bm + (ts * G + i_g) * N + rn, mask=mn, other=0.0).to(tl.float32)
            for t in range(ts, te):
                tl.store(slab + (t - ts) * BD * BN + off_slab, h)
                tn = t + 1
                ok = tn < te
                m_d = tl.where(ok, md, False)
                xn = tl.load(x + tn * D + rd, mask=m_d, other=0.0).to(tl.float32)
                un = tl.load(dt + tn * D + rd, mask=m_d, other=0.0).to(tl.float32) + bias
                Bn = tl.load(Bm + (tn * G + i_g) * N + rn, mask=tl.where(ok, mn, False), other=0.0).to(tl.float32)
                if SOFTPLUS:
                    e = tl.exp(-tl.abs(ut))
                    w = 1.0 + e
                    wm = w - 1.0
                    s = tl.maximum(ut, 0.0) + tl.where(wm == 0.0, e, tl.log(w) * (e / tl.where(wm == 0.0, 1.0, wm)))
                else:
                    s = ut
                h = tl.exp(s[:, None] * Am) * h + (s * xt)[:, None] * Bt[None, :]
                xt, ut, Bt = xn, un, Bn
            tl.debug_barrier()  # the slab is complete before any thread reads it back

            # 2. the chunk backward, token te - 1 down to ts
            last = te - 1
            hp = tl.load(slab + (last - ts) * BD * BN + off_slab)
            xt = tl.load(x + last * D + rd, mask=md, other=0.0).to(tl.float32)
            ut = tl.load(dt + last * D + rd, mask=md, other=0.0).to(tl.float32) + bias
            zt = tl.load(z + last * D + rd, mask=md, other=0.0).to(tl.float32) if HAS_Z else xt
            dyt = tl.load(dy + last * D + rd, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(Bm + (last * G + i_g) * N + rn, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(Cm + (last * G + i_g) * N + rn, mask=mn, other=0.0).to(tl.float32)
            for tt in range(0, te - ts):
                t = te - 1 - tt
                # token t - 1's loads go out before token t's arithmetic
                tn = t - 1
                ok = tn >= ts
                m_d, m_n = tl.where(ok, md, False), tl.where(ok, mn, False)
                hp_n = tl.load(slab + (tn - ts) * BD * BN + off_slab, mask=tl.where(ok, mdn, False), other=0.0)
                xn = tl.load(x + tn * D + rd, mask=m_d, other=0.0).to(tl.float32)
                un = tl.load(dt + tn * D + rd, mask=m_d, other=0.0).to(tl.float32) + bias
                zn = tl.load(z + tn * D + rd, mask=m_d, other=0.0).to(tl.float32) if HAS_Z else xn
                dyn = tl.load(dy + tn * D + rd, mask=m_d, other=0.0).to(tl.float32)
                Bn = tl.load(Bm + (tn * G + i_g) * N + rn, mask=m_n, other=0.0).to(tl.float32)
                Cn = tl.load(Cm + (tn * G + i_g) * N + rn, mask=m_n, other=0.0).to(tl.float32)

                if SOFTPLUS:
                    e = tl.exp(-tl.abs(ut))
                    w = 1.0 + e
                    wm = w - 1.0
                    s = tl.maximum(ut, 0.0) + tl.where(wm == 0.0, e, tl.log(w) * (e / tl.where(wm == 0.0, 1.0, wm)))
                else:
                    s = ut
                a = tl.exp(s[:, None] * Am)
                ah = a * hp  # a_t h_{t-1}
                sx = s * xt
                h = ah + sx[:, None] * Bt[None, :]
                if HAS_Z:
                    yp = tl.sum(h * Ct[None, :], axis=1)
                    if HAS_D:
                        yp += Dv * xt
                    sig = 1.0 / (1.0 + tl.exp(-zt))
                    dzt = dyt * yp * sig * (1.0 + zt * (1.0 - sig))
                    tl.store(dz + t * D + rd, dzt.to(dz.dtype.element_ty), mask=md)
                    dyp = dyt * zt * sig
                else:
                    dyp = dyt
                dh += dyp[:, None] * Ct[None, :]
                tl.store(dC + off_bc + t * G * N, tl.sum(dyp[:, None] * h, axis=0), mask=mn)
                tl.store(dB + off_bc + t * G * N, tl.sum(dh * sx[:, None], axis=0), mask=mn)
                dhB = tl.sum(dh * Bt[None, :], axis=1)
                dxt = s * dhB
                if HAS_D:
                    dxt += Dv * dyp
                    dD_acc += dyp * xt
                tl.store(dx + t * D + rd, dxt.to(dx.dtype.element_ty), mask=md)
                dah = dh * ah  # the gradient of the exponent s_t A, elementwise
                ds = tl.sum(dah * Am, axis=1) + xt * dhB
                dA_acc += dah * s[:, None]
                if SOFTPLUS:
                    du = ds / (1.0 + tl.exp(-ut))
                else:
                    du = ds
                dbias_acc += du
                tl.store(ddt + t * D + rd, du.to(ddt.dtype.element_ty), mask=md)
                dh = dh * a  # into dh_{t-1}
                hp, xt, ut, zt, dyt, Bt, Ct = hp_n, xn, un, zn, dyn, Bn, Cn
        tl.store(dA + off_state, dA_acc, mask=mdn)
        if HAS_D:
            tl.store(dD + i_s * D + rd, dD_acc, mask=md)
        if HAS_BIAS:
            tl.store(dbias + i_s * D + rd, dbias_acc, mask=md)
        if HAS_H0:
            tl.store(dh0 + off_state, dh, mask=mdn)
