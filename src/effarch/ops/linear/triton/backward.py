"""Host side of the backward of the chunked linear recurrence: recompute the forward states, run the reverse
state pass and the chunk-local gradient kernels, and (additive rule) the log-decay gradient.

For the additive rule the decay gradient follows from dq and dk alone: writing q~_t = q_t e^{G_t} and
k~_t = k_t e^{-G_t} with G the cumulative log decay over the whole sequence, the loss depends on G_t only
through q~_t and k~_t (and on G at the end through the final state), so
  dg_t = sum_{u >= t} (q_u dq_u - k_u dk_u) + sum_V S_T dS_T        (per key; summed over K for scalar g)
("Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv 2312.06635). The terms of the
tokens after t's chunk sum to sum_V S dS for the state S leaving the chunk and its gradient dS, which the dq / dk
kernel forms per chunk (DECAY_GRAD_LATER), so only a chunk-long sum remains. The delta rule's decay gradient is
formed inside the chunk kernel.
"""

from __future__ import annotations

import torch

from effarch.ops.grid import cdiv
from effarch.ops.linear.triton import bwd_kernels, launch
from effarch.ops.linear.triton.launch import (
    SUBBLOCK,
    KeptStates,
    _empty,
    _pow2,
    dot_code,
    forward_pieces,
    gkind,
    state_blocks,
)
from effarch.ops.linear.triton.layout import ChunkTable

# 16-bit inputs: products of the delta rule's reverse state pass, and of the backward kernels when the
# additive rule's decay gradient is formed from dq and dk, are taken in tf32 rather than in the input dtype.
# Measured on an H200 with Triton 3.6, bf16 inputs, T = 512: with bf16 products the delta-rule state pass came
# out wrong (relative error ~1, once an illegal memory access; tf32 products: 2e-3), and the fixed per-head
# decay's gradient had relative error 2.3e-2 with bf16 products everywhere, 1.7e-2 with tf32 in the
# chunk-local kernel only and 7.4e-3 with tf32 everywhere, as q dq - k dk cancels. The delta rule's state pass has
# since kept every key row and 32+ value columns per program (launch.state_blocks): with bf16 products it passes
# the CUDA tests and took 4.97 ms of fwd + bwd against 5.49 with tf32 (gated delta 6.06 against 6.91; H200, 8K).
STATE_BWD_DOTS = "input"
# The additive rule's backward products when it has a decay: "tf32", "input", or "auto": the input dtype where the
# decay gradient's later share comes from the states (DECAY_GRAD_LATER), whose chunk-long sums hold bf16 rounding
# (H200, 8K, bf16: decay gradient 2.9e-3 relative error for scalar and per-key decay), tf32 with the
# sequence-long suffix sums. Scalar decay's fwd + bwd took 2.19 ms with "input" against 3.69 with tf32 there.
DECAY_GRAD_DOTS = "auto"
# The additive rule's dv kernel: "input" takes its products in the 16-bit inputs' dtype whatever DECAY_GRAD_DOTS
# says (dv does not enter the decay gradient's long sums), "decay" as the decay-gradient kernels do.
DV_DOTS = "input"
# The delta rule's dq / dk / dW kernel: with products in the input dtype it must hold all K keys per program (blocks
# of 64 gave wrong dk in bf16 on an H200, see dqk_kernel's launch); with tf32 products it runs in blocks of 64 keys.
# At K = V = 128 (bf16, 8 warps) its sm_90 build with Triton 3.6 takes 175 registers per thread for the delta rule and
# 234 for gated delta, without spills, since it stores dW before its epilogue and forms gated delta's decay gradient
# before dq and dk (206, and 255 with 220 B spilled, before); the WY backward's reordered epilogue likewise spills 0
# and 192 B (188 and 564 before). On an H200 (B*T = 32K, fwd + bwd) gated delta 3.913 -> 3.720 ms at 8K, the delta
# rule 3.041 -> 3.016. "input" until measured side by side.
DELTA_DQK_DOTS = "input"
# The delta rule's gradient buffers that pass between its backward kernels (dU, dW and dk's first part, [T, H, V]
# and [T, H, K]): "float32", or "input" to keep them in 16-bit inputs' dtype, halving what the WY backward reads
# (it was 0.36 of 1.1 ms at the copy bandwidth at 8K). On an H200 (8K, bf16) "input" took the delta rule's fwd + bwd
# to 4.93 ms from 5.49, gated delta to 6.32 from 6.91.
DELTA_GRAD_BUFFERS = "input"
# Value columns per program of the delta rule's reverse state pass when its products are tf32 (or float32): 16
# runs twice the programs of 32 and its sm_90 build spills 64 B per thread against 272 B (8 warps, K = V = 128).
# Narrower blocks with bf16 products gave wrong gradients on an H200 (see launch.state_blocks), so the input-dtype
# products keep 32. 16 lost on an H200 (8K, bf16): delta rule fwd + bwd 6.23 ms against 5.49, gated delta 7.66
# against 6.91.
DELTA_STATE_BWD_BV = 32
# The decay gradient's suffix sums over each sequence (with DECAY_GRAD_LATER = "suffix"): one Triton pass walking
# each sequence's chunks from the last (True), or PyTorch's two-level reverse cumsum and the end term added after
# (False): at 8K GLA's backward on an
# H200 ran six flips of the PyTorch form (0.4 ms of its 6.6 ms) beside their cumsums and adds. The Triton pass took
# GLA's fwd + bwd to 5.67 ms from 6.60 (8K, bf16); scalar decay was even (3.02 / 3.06 against 2.98 / 3.41).
DECAY_SUFFIX_KERNEL = True
# Keys per program of that pass and its warps. Each program walks its sequence's chunks one after another, so only
# cdiv(K, BD) x sequences x heads programs run (256 at 4 x 8K tokens, 16 heads of 128 keys with 32): at 0.2 ms per
# GLA layer on an H200 it moved its 256 MB at a third of the copy bandwidth. Narrower blocks run more programs: GLA
# fwd + bwd on an H200 (bf16) with 8 keys and one warp 5.47 / 6.06 ms at 8K / 32K against 5.51 / 6.28 with 32 keys and
# four, the fastest of nine (benchmarks/linear_ops.py --try "DECAY_SUFFIX_BD=32,16,8;DECAY_SUFFIX_WARPS=1,2,4").
DECAY_SUFFIX_BD = 8
DECAY_SUFFIX_WARPS = 1
# The reverse state pass's output dS per chunk ([NT, H, K, V], read again by the dv and dq / dk kernels): "float32",
# or "input" to store it in 16-bit inputs' dtype (the sequential pass still carries float32), halving the largest
# buffer of the backward (537 MB at 32K tokens, 16 heads of 128 x 128). On an H200 (8K, bf16) "input" took scalar
# decay's fwd + bwd to 2.98 ms from 3.41, GLA's to 5.52 from 5.67 (with the suffix kernel).
STATE_GRAD_BUFFER = "input"
# The additive rule's decay gradient, dg_t = sum_{u >= t} (q_u dq_u - k_u dk_u) + sum_V S_T dS_T: "suffix" sums every
# later token's term along the sequence (a sequential pass per sequence for per-key decay); "state" sums only the
# tokens of t's own chunk and takes the later chunks' share from the state leaving the chunk and its gradient
# (sum_V S dS, formed in `dqk_kernel` from what it loads anyway), every chunk in parallel and without long sums whose
# terms cancel. bf16 inputs against the float32 reference (2 x 256 tokens, K = V = 32, tf32 products): one fixed
# decay per head 8.2e-2 and 1.6e-1 relative error with "suffix", 5.7e-3 and 1.4e-3 with "state"; scalar decay
# 1.1e-2 / 6.9e-3 against 2.4e-3 / 2.0e-3; per-key 7.8e-3 / 9.9e-3 against 2.0e-3 / 2.3e-3 (two seeds). "auto":
# "state" for scalar decay, "suffix" per key. On an H200 (8K, bf16, fwd + bwd ms) scalar decay took 2.19 with the
# state form and input products against 3.01 with suffix sums and tf32; GLA took 5.82 and 6.12 (tf32) against 5.49.
DECAY_GRAD_LATER = "auto"
# Warps and pipeline stages of the backward kernels (`benchmarks/linear_ops.py --try` sweeps them): the reverse
# state pass (the additive rule's two-phase pass, which takes no products, runs with 4 warps whatever this says),
# the dq / dk / dW kernel and the delta rule's WY backward. On an H200 (8K, bf16, fwd + bwd ms, one run) 4 warps for
# the reverse state pass and the WY backward took the delta rule from 3.79 to 3.21 and gated delta from 4.75 to 4.15
# (each alone: 3.46 / 4.40 with the WY backward's); GLA unchanged (5.27 against 5.28).
STATE_BWD_WARPS = 4
# Pipeline stages, same run and sizes: 2 for the dq / dk / dW kernel (was 1) took the delta rule 3.22 -> 3.09 and
# gated delta 4.15 -> 4.01, GLA unchanged; 1 or 3 for the reverse state pass were slower (3.37 / 3.49 delta rule).
STATE_BWD_STAGES = 2
DQK_WARPS = 8
DQK_STAGES = 2
# The dq / dk / dW kernel's value columns per step of its loop over V, and whether it takes 64 keys per program with
# products in the inputs' 16-bit dtype too (it does with tf32 products, and under the interpreter). Keys split that
# way gave a wrong dk for the delta rule on an H200 with Triton 3.6 (values in steps of 32: products [64, 32] x
# [32, 64], a shape of Hopper's wgmma bugs, see launch.WGMMA); steps of 64 may avoid it. Its three [64, K] float32
# accumulators then hold half the registers. As shipped until checked and timed on a GPU.
DQK_BV = 32
DQK_SPLIT_HALF = False
WY_BWD_WARPS = 4
WY_BWD_STAGES = 1
# The delta rule's reverse state pass with the state gradient held as two [64, BV] tiles of keys
# (`delta_state_bwd_kernel`, heads of at most 128 keys) rather than one [K, BV] tile: each product is then 64 keys
# deep or wide, as in fla's pass. Compiled for sm_90 at K = V = 128 with 8 warps (bf16 products, BV 32) it spills 0 B
# per thread against 104 (gated delta 72 against 140). Timed on an H200 (8K, fwd + bwd ms, 4 warps, BV 64, WY backward
# with 4 warps): 3.19 against the one-tile pass's 3.21 with 4 warps, gated delta 4.17 against 4.15: a wash, so off;
# values per program and warps of its own.
DELTA_STATE_BWD_SPLIT = False
DELTA_SPLIT_BV = 32
DELTA_SPLIT_WARPS = 8


def reverse_cumsum(x: torch.Tensor, dim: int, block: int = 64) -> torch.Tensor:
    """sum_{u >= t} x_u along `dim`, in two levels: inside blocks of `block` entries, then over the blocks'
    totals (recursively). PyTorch scans a dimension that is not the innermost one sequentially along it, with
    one thread per other element: on an H200 the plain flip-cumsum-flip over T = 8K tokens of a [B, T, H, K]
    float32 tensor took 3.1 ms, most of the per-key decay's backward beside its kernels."""
    x = x.movedim(dim, 0)
    L = x.shape[0]
    if L <= block:
        return x.flip(0).cumsum(0).flip(0).movedim(0, dim)
    n = -(-L // block)
    if n * block > L:
        x = torch.cat([x, x.new_zeros(n * block - L, *x.shape[1:])])
    within = x.reshape(n, block, *x.shape[1:]).flip(1).cumsum(1).flip(1)
    later = reverse_cumsum(within[:, 0], 0, block)  # totals of block j and every block after it
    within[:-1] += later[1:, None]
    return within.reshape(n * block, *x.shape[1:])[:L].movedim(0, dim)


def _suffix_sums(x: torch.Tensor, table: ChunkTable, dense_len: int) -> torch.Tensor:
    """sum_{u >= t, same sequence} x_u along dim 0 of x [T, ...] (float32)."""
    if dense_len > 0:
        return reverse_cumsum(x.reshape(-1, dense_len, *x.shape[1:]), 1).reshape(x.shape)
    # Packed sequences: suffix sums over the whole buffer minus the suffix after each sequence's end, in
    # float64 so the difference of two long sums keeps float32 accuracy.
    s = reverse_cumsum(x.double(), 0)
    s = torch.cat([s, s.new_zeros(1, *s.shape[1:])])
    return (s[:-1] - s[_eos_of_tokens(table, x.shape[0])]).float()


def _seq_of_tokens(table: ChunkTable, T: int) -> torch.Tensor:
    cu = table.cu.long()
    return torch.repeat_interleave(torch.arange(table.n_seqs, device=cu.device), cu[1:] - cu[:-1], output_size=T)


def _eos_of_tokens(table: ChunkTable, T: int) -> torch.Tensor:
    return table.cu.long()[1:][_seq_of_tokens(table, T)]


def additive_decay_grad(x, hT, dhT, per_key: bool, table: ChunkTable, dense_len: int, chunk: int) -> torch.Tensor:
    """dg [T, H] or [T, H, K] float32 by the identity in the module docstring, from x = q dq - k dk per token
    ([T, H, K], or summed over K for scalar decay: [T, H])."""
    end = None
    if dhT is not None:
        end = (hT * dhT).sum(-1)  # [N, H, K]
        if not per_key:
            end = end.sum(-1)
    if DECAY_SUFFIX_KERNEL:
        H = x.shape[1]
        D = x.shape[2] if per_key else 1
        dg = _empty(*x.shape, dtype=torch.float32, device=x.device)
        BD = min(_pow2(D), DECAY_SUFFIX_BD)
        bwd_kernels.suffix_sum_kernel[(cdiv(D, BD), table.n_seqs * H)](
            x.contiguous(), x if end is None else end.contiguous(), dg, table.cu, table.seq_chunk, H, D, chunk, BD,
            end is not None, num_warps=DECAY_SUFFIX_WARPS,
        )  # fmt: skip
        return dg
    dg = _suffix_sums(x, table, dense_len)
    if end is not None:
        dg = dg + end[_seq_of_tokens(table, x.shape[0])]
    return dg


def decay_grad_forms(gk: int) -> tuple[bool, str]:
    """(whether the additive rule's decay gradient takes its later share from the states, "tf32" or "input" for
    its backward products) for decay kind gk (1 scalar, 2 per key) under DECAY_GRAD_LATER and DECAY_GRAD_DOTS."""
    later = launch.setting("backward", "DECAY_GRAD_LATER", DECAY_GRAD_LATER, ("auto", "suffix", "state"))
    dots = launch.setting("backward", "DECAY_GRAD_DOTS", DECAY_GRAD_DOTS, ("auto", "tf32", "input"))
    from_states = later == "state" or (later == "auto" and gk == 1)
    if dots == "auto":
        dots = "input" if from_states else "tf32"
    return from_states, dots


def chunk_backward(
    do: torch.Tensor,
    dhT: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    h0: torch.Tensor | None,
    saved: torch.Tensor | None,
    table: ChunkTable,
    chunk: int,
    scale: float,
    dense_len: int,
    *,
    delta: bool,
    states: KeptStates | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(dq, dk, dv, dg, dbeta, dh0) for packed inputs (shapes as in launch.py): dq, dk, dv in the inputs'
    dtype, dg float32, dbeta in beta's dtype, dh0 float32 [N, H, K, V]. `saved`: the forward's delta-rule
    inverses or per-key intra-chunk scores (recomputed when None); `states`: what the forward kept of its state
    pass (recomputed when None)."""
    T, H, K = q.shape
    V = v.shape[-1]
    gk = gkind(g)
    BK, dtc, NT, N = _pow2(K), dot_code(q.dtype), table.n_chunks, table.n_seqs
    dev = q.device
    dummy = q
    additive_decay = g is not None and not delta
    from_states, decay_dots = decay_grad_forms(gk)
    from_states = from_states and additive_decay
    state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    p = forward_pieces(q, k, v, g, beta, h0, table, chunk, delta=delta, store_final=additive_decay and not from_states and dhT is not None,
                       state_dtype=state_dtype, X=saved if delta else None, states=states)  # fmt: skip
    A = saved if gk == 2 else None
    if gk == 2 and A is None:
        A = launch.gla_scores(q, k, p.G, table, chunk)
    half = q.dtype != torch.float32
    state_dtc = 4 if (half and (delta and STATE_BWD_DOTS == "tf32" or additive_decay and decay_dots == "tf32")) else dtc
    local_dtc = 4 if (half and additive_decay and decay_dots == "tf32") else dtc

    def dv_local(out, dh, add_state, dots):
        BVl = min(_pow2(V), launch.DV_LOCAL_BV)
        bwd_kernels.dv_local_kernel[(cdiv(V, BVl), NT, H)](
            q, k, dummy if p.G is None else p.G, dummy if A is None else A, dummy if dh is None else dh, do, out,
            table.chunk_tok, table.chunk_eos, scale, H, K, V, chunk, BK, BVl, gk, add_state, dots, min(BK, 64),
            num_warps=launch.DV_LOCAL_WARPS,
        )  # fmt: skip

    # Delta rule: the chunk-local part of dU first; the reverse state pass adds (K e^R) dS to it in place.
    dU = None
    buf = q.dtype if half and DELTA_GRAD_BUFFERS == "input" else torch.float32  # see DELTA_GRAD_BUFFERS
    if delta:
        dU = _empty(T, H, V, dtype=buf, device=dev)
        dv_local(dU, None, False, state_dtc)
    # Reverse state pass (tf32 products for the delta rule: see STATE_BWD_DOTS).
    dh = _empty(NT, H, K, V, dtype=q.dtype if half and STATE_GRAD_BUFFER == "input" else torch.float32, device=dev)
    dh0 = _empty(N, H, K, V, dtype=torch.float32, device=dev)
    two_phase = launch.two_phase_pass(gk, N, NT, delta)
    D = dh
    if two_phase:  # each chunk's scale (Q e^G)^T dO first, into dh when float32; the pass reads it from there
        D = dh if dh.dtype == torch.float32 else _empty(NT, H, K, V, dtype=torch.float32, device=dev)
        launch.chunk_terms(q, do, p.G, D, table, chunk, scale, reverse=True, dtc=state_dtc)
    if two_phase and not delta:
        BKs, BVs = launch.scan_blocks(K, V, N * H)
    else:
        BKs, BVs = state_blocks(K, V, N * H, split=additive_decay)
        if delta and state_dtc in (0, 4):
            BVs = min(BVs, DELTA_STATE_BWD_BV)
    if delta and K <= 128 and DELTA_STATE_BWD_SPLIT:  # the state gradient as two tiles of 64 keys
        bwd_kernels.delta_state_bwd_kernel[(cdiv(V, DELTA_SPLIT_BV), N * H)](
            q, k, p.W, q if p.G is None else p.G, do, dh, q if dhT is None else dhT, dh0, dU, D, table.cu,
            table.seq_chunk, scale, H, K, V, chunk, DELTA_SPLIT_BV, gk, dhT is not None, True, state_dtc, two_phase,
            num_warps=DELTA_SPLIT_WARPS, num_stages=STATE_BWD_STAGES,
        )  # fmt: skip
    else:
        bwd_kernels.state_bwd_kernel[(cdiv(V, BVs), cdiv(K, BKs), N * H)](
            q, k, q if p.W is None else p.W, q if p.G is None else p.G, do, dh, q if dhT is None else dhT, dh0,
            q if dU is None else dU, D, table.cu, table.seq_chunk, scale, H, K, V, chunk, BKs, BVs, gk, delta,
            dhT is not None, True, state_dtc, two_phase, num_warps=4 if two_phase and not delta else STATE_BWD_WARPS,
            num_stages=STATE_BWD_STAGES,
        )  # fmt: skip
    dv = _empty(T, H, V, dtype=v.dtype, device=dev)
    if not delta:
        dv_input = launch.setting("backward", "DV_DOTS", DV_DOTS, ("input", "decay")) == "input"
        dv_local(dv, dh, True, dtc if dv_input else local_dtc)
    # dq and dk (float32 where more terms are added to them later), dW for the delta rule
    f32 = lambda *shape: _empty(*shape, dtype=torch.float32, device=dev)  # noqa: E731
    dq = f32(T, H, K) if gk == 2 else _empty(T, H, K, dtype=q.dtype, device=dev)
    dk = f32(T, H, K) if gk == 2 else _empty(T, H, K, dtype=buf if delta else k.dtype, device=dev)
    dw = _empty(T, H, K, dtype=buf, device=dev) if delta else None
    # Key columns per program: with blocks of 64 the [C, BK] float32 accumulators stay in registers. Not with
    # native 16-bit products (DTC 1, 2): there the split gave wrong dk for the delta rule on an H200 with Triton 3.6.
    dqk_dtc = 4 if (half and delta and DELTA_DQK_DOTS == "tf32") else local_dtc
    BKq = BK if dqk_dtc in (1, 2) and not DQK_SPLIT_HALF else min(BK, 64)
    NKq = cdiv(K, BKq)
    dgx = f32(NKq, T, H) if gk == 1 else None
    dA = f32(T, H, chunk) if gk == 2 else None
    later = f32(NT, H, K) if from_states and gk == 2 else None  # the later chunks' share, per key
    bwd_kernels.dqk_kernel[(NT, H, NKq)](
        q, k, v if p.vnew is None else p.vnew, dummy if p.G is None else p.G, p.h, dh, do, dummy if dU is None else dU,
        dq, dk, dummy if dw is None else dw, dummy if dgx is None else dgx, dummy if dA is None else dA,
        table.chunk_tok, table.chunk_eos, scale, T, H, K, V, chunk, BKq, BK, min(_pow2(V), DQK_BV), gk, delta,
        dqk_dtc, num_warps=DQK_WARPS, num_stages=DQK_STAGES, later=dummy if later is None else later, LATER=from_states,
    )  # fmt: skip
    if dgx is not None:
        dgx = dgx.sum(0) if NKq > 1 else dgx[0]
    dg = dbeta = None
    if delta:
        dbeta = _empty(T, H, dtype=torch.float32, device=dev)
        dg = f32(T, H) if gk == 1 else None
        dk_part, dk = dk, _empty(T, H, K, dtype=k.dtype, device=dev)
        bwd_kernels.wy_bwd_kernel[(NT, H)](
            k, v, dummy if p.G is None else p.G, beta, p.X, dU, dk_part, dw, dummy if dgx is None else dgx, dk, dv,
            dbeta, dummy if dg is None else dg, table.chunk_tok, table.chunk_eos, H, K, V, chunk, SUBBLOCK, BK,
            min(_pow2(V), 32), gk, dtc, num_warps=WY_BWD_WARPS, num_stages=WY_BWD_STAGES,
        )  # fmt: skip
        dbeta = dbeta.to(beta.dtype)
    if gk == 2:
        dqo, dko, dgx = (
            _empty(T, H, K, dtype=q.dtype, device=dev),
            _empty(T, H, K, dtype=k.dtype, device=dev),
            f32(T, H, K),
        )
        BKi = BK if launch.GLA_INTRA_BWD_BK == 0 else min(BK, launch.GLA_INTRA_BWD_BK)
        bwd_kernels.gla_intra_bwd_kernel[(NT * (chunk // SUBBLOCK), H, cdiv(K, BKi))](
            q, k, p.G, dA, dq, dk, dqo, dko, dgx, table.chunk_tok, table.chunk_eos, H, K, chunk, SUBBLOCK, BKi,
            local_dtc, num_warps=launch.GLA_INTRA_BWD_WARPS,
        )  # fmt: skip
        dq, dk = dqo, dko
    if from_states:  # scalar decay: dq / dk's kernel wrote the decay gradient itself
        if gk == 2:  # each chunk's reverse cumsum plus the later chunks' share, in place
            BD = min(BK, 32)
            bwd_kernels.chunk_suffix_kernel[(cdiv(K, BD), NT, H)](
                dgx, later, dgx, table.chunk_tok, table.chunk_eos, H, K, chunk, BD
            )  # fmt: skip
        dg = dgx
    elif additive_decay:
        dg = additive_decay_grad(dgx, p.hT, dhT, gk == 2, table, dense_len, chunk)
    return dq, dk, dv, dg, dbeta, dh0
