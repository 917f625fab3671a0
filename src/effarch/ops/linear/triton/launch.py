"""Host side of the Triton linear-recurrence kernels: buffers, block sizes and launch grids.

All functions take packed token tensors q, k [T, H, K], v [T, H, V] (contiguous, one dtype), log decay
g None / [T, H] / [T, H, K] float32, beta [T, H], and a `ChunkTable`; states are float32 [N, H, K, V].
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from effarch.ops.grid import cdiv, next_power_of_2
from effarch.ops.linear.triton import fwd_kernels, recurrent_kernel
from effarch.ops.linear.triton.layout import ChunkTable

# Kernels are looked up on their modules at each launch, so reloading a kernel module (to switch the
# Triton interpreter on or off) takes effect here.

# Launch configurations: the forward kernels use 4 warps (8 warps, which the compiler's register report
# favours, measured 1.3-1.9x slower forward on an H200); the backward kernels use 8 warps and fewer pipeline
# stages so their shared memory fits.
POISON = False  # tests set this: every buffer starts as NaN, so a value no kernel wrote cannot pass
SUBBLOCK = 16  # BC: rows per sub-block of the triangular inverse and of the per-key intra-chunk scores
_DTC = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Hopper (sm_90): Triton's warpgroup MMA (wgmma) code for these kernels is wrong at some head widths. Measured
# on an H200 with Triton 3.6, bf16, T = 200: K > V with V = 32 (64 x 32, Mamba2 and Jamba heads at the arena's
# small size) gave wrong outputs or illegal memory accesses for every rule but per-key decay, and K = 16 with a
# scalar or fixed decay gave wrong dq; K x V in {32x32, 32x64, 64x64, 128x64, 128x128} matched the reference.
# Without wgmma (the mma.sync path) every width matched, but the delta rule's backward ran 5.5x slower at
# K = V = 128 (T = 8K: 38.5 ms against 7.0 ms). Peers report the same compiler bug ("Triton 3.6.0 and later may
# cause an illegal memory access", triton-lang issue 10573). So wgmma is used only at widths where it was right.
WGMMA: bool | None = None  # None: by width (wgmma_ok); True / False: always / never (for measurements)


def wgmma_ok(K: int, V: int) -> bool:
    """Key and value widths at which the wgmma build matched the reference (see WGMMA)."""
    return K >= 32 and V >= 32 and (V >= K or V >= 64)


@contextlib.contextmanager
def kernel_build_options(K: int, V: int):
    """Within it, Triton compiles the kernels for heads of K x V with wgmma only where that is right (see WGMMA).
    The switch is an environment variable Triton reads while compiling (and keys its cache on); the kernels
    specialise on K and V, so each width keeps the build it was first compiled with. Restored on exit."""
    if WGMMA if WGMMA is not None else wgmma_ok(K, V):
        yield
        return
    old = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MMA_V3", None)
        else:
            os.environ["DISABLE_MMA_V3"] = old


HALF_DOTS = "input"  # 16-bit inputs: "input" = products in the input dtype (fast), "tf32" = in tf32 (precise)


def dot_code(dtype: torch.dtype) -> int:
    """The kernels' DTC for inputs of `dtype` (see fwd_kernels.py)."""
    if dtype != torch.float32 and HALF_DOTS == "tf32":
        return 4
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return 3
    return _DTC[dtype]


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.empty(*shape, dtype=dtype, device=device)
    return x.fill_(float("nan")) if POISON else x


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return _empty(*x.shape, dtype=x.dtype, device=x.device)


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


STATE_PROGRAMS = 512  # the sequential state passes split the state into blocks until about this many programs run


def state_blocks(K: int, V: int, n_heads: int, split: bool) -> tuple[int, int]:
    """(BK, BV) blocks of the state for the sequential state passes over `n_heads` (sequences x heads) states:
    each program walks its sequence's chunks one after the other, so with few sequences (one long sequence)
    the state is cut finer to keep the GPU busy. Only with `split`: the additive rule with a decay, whose
    reverse pass takes tf32 products. On an H200 with Triton 3.6 the blocks below [K, 32] gave wrong gradients
    (relative error 0.3, and an illegal memory access for the gated delta rule) where the products were bf16:
    the rule without decay and the delta rule; the delta rule also needs every key row in one program."""
    BK, BV = _pow2(K), min(_pow2(V), 32)
    count = lambda: n_heads * cdiv(V, BV) * cdiv(K, BK)  # noqa: E731
    while split and BK > 32 and count() < STATE_PROGRAMS:
        BK //= 2
    while split and BV > 16 and count() < STATE_PROGRAMS:
        BV //= 2
    return BK, BV


# The additive rule's state passes: "fused" walks each sequence's chunks with the chunk's products inside the
# sequential loop; "two_phase" forms every chunk's own term first, all chunks in parallel (`chunk_outer_kernel`),
# so the sequential pass only decays and adds (and the delta rule's reverse pass takes one product fewer); "auto"
# takes two phases for per-key decay's reverse pass (its forward: GLA_FWD_STATE_PASS), and for a scalar decay or
# the delta rule over sequences of TWO_PHASE_CHUNKS chunks or more on average; the additive rule without decay stays
# fused. Measured on an H200 (fwd + bwd, 32,768
# tokens, H = 16, K = V = 128, bf16, states kept): two phases won for GLA at 8K and 32K (8.67 against 8.95 ms, 8.71
# against 10.00) and at 32K for scalar decay (3.69 against 4.49), the delta rule (6.97 against 7.35) and gated delta
# (8.84 against 9.17), but lost for linear attention (no decay) at 32K (3.18 against 2.14) and 8K (2.43 against
# 2.21); at 8K the fused pass won for scalar decay (3.02 against 3.33) and the gated delta rule (7.33 against 7.41),
# and the delta rule was even (5.99 against 6.04).
STATE_PASS = "auto"
TWO_PHASE_CHUNKS = 256
# Per-key decay's forward state pass under "auto" (its reverse pass always takes two phases there): "auto" takes two
# phases over sequences of TWO_PHASE_CHUNKS chunks or more on average, as for a scalar decay; "fused" / "two_phase"
# always. On an H200 (bf16, B*T = 32K, states kept; fwd / fwd + bwd ms) fused against two phases: 1.239 / 4.764
# against 1.434 / 4.965 at 8K x 4, 1.635 / 5.637 against 1.539 / 5.540 at 32K x 1; both passes fused lost at 8K
# (5.062 against 5.036 before the fused forward): the reverse pass is the one that gains from two phases.
GLA_FWD_STATE_PASS = "auto"
# Warps per program of chunk-local kernels whose sm_90 build spills at K = V = 128 with 4 warps (ptxas, bf16):
# delta_prep 2.7 KB per thread (52 B with 8), dv_local with tf32 products 1.2 KB (none with 8), out_fwd with a
# scalar decay 0.4 KB (none with 8). Fewer spills need not mean faster (8 warps measured slower forward before):
# kept at 4 until measured side by side (benchmarks/linear_ops.py --try).
DELTA_PREP_WARPS = 4
# The delta rule's inverse (I + A)^{-1} per chunk: False builds it block row by block row through memory (each block
# row reads the rows above it back, and K's blocks are loaded again for every block of A); True holds every 16 x 16
# block of A and of the inverse in registers and writes the inverse once (chunks of 4 sub-blocks only). On an H200
# (8K, bf16, with bf16 reverse-pass products) the delta rule's fwd + bwd took 4.92 ms against 4.97, gated delta 5.98
# against 6.06, the forwards 1.53 / 1.78 against 1.58 / 1.87.
DELTA_PREP_IN_REGS = True
# The inverse of each 16 x 16 diagonal block of I + A: "substitution" (15 sequential row steps, each two reductions
# across the block) or "doubling" (4 steps of two 16 x 16 float32 products, fwd_kernels.unit_lower_inverse). On an
# H200 (8K, bf16, 4 warps) doubling took the delta rule's forward to 1.23 ms from 1.53 (fwd + bwd 4.07 from 4.37),
# gated delta's to 1.45 from 1.78 (5.05 from 5.38); with 8 warps both forms were slower. Its sm_90 build spills
# 456 B per thread against 84 (gated: 636 against 180) and is still the faster.
DELTA_INVERSE = "doubling"
DV_LOCAL_WARPS = 4
# Value columns per program of dv_local_kernel: each program recomputes the chunk's scores (per-key decay: its
# decayed keys K e^{G_C - G}, [C, K]) for its columns, so 64 of 128 does that twice per chunk. On an H200 (8K, bf16,
# fwd + bwd ms, one run) 128 with 4 warps against 64: GLA 4.975 / 5.033, delta rule 3.054 / 3.092, gated delta
# 3.934 / 3.968, scalar decay even (1.918 / 1.920); 8 warps lost at both widths.
DV_LOCAL_BV = 128
OUT_FWD_WARPS = 4
# Warps and pipeline stages of the sequential state passes (forward; backward in backward.py): each program walks
# its sequence's chunks one after another, so with few programs per SM (256 at 4 x 8K tokens, 16 heads, 4 value
# blocks) their latency per chunk sets the pace. Named here so `benchmarks/linear_ops.py --try` can sweep them.
# Stages on an H200 (8K, bf16, forward ms): 2 (Triton's default is 3) gated delta 1.416 -> 1.369, the delta rule
# 1.203 -> 1.194, GLA unchanged (1.436 / 1.435); 4 no better than 3.
STATE_FWD_WARPS = 4
STATE_FWD_STAGES = 2
# GLA's intra-chunk scores: keys per block inside a program (0: all at once; whole-K tiles spilled 100 B per thread on
# sm_90 with 4 warps).
GLA_INTRA_BK = 64
# GLA's intra-chunk backward: keys per program (0: all of them) and warps. Compiled for sm_90 at K = 128 with 8 warps,
# whole-K programs take 255 registers per thread and spill; blocks of 64 keys take 210, of 32 keys 154 (186 with
# 4 warps, two programs per SM).
GLA_INTRA_BWD_BK = 0
GLA_INTRA_BWD_WARPS = 8  # whole-K programs: 1.25 ms against 1.79 in unrolled 64-key blocks with 4 warps (H200, 8K)
SCAN_PROGRAMS = 1024  # a two-phase additive pass cuts the state into blocks until about this many programs run
# A training forward keeps the states entering each chunk ([NT, H, K, V] in the inputs' dtype; dense batches), and for
# the delta rule W and the pseudo-values, for the backward instead of having it form them again: memory for a
# sequential pass (and the delta rule's WY kernel). The states cost H * K * V / chunk values per token per layer
# (16 heads of 128 x 128 in bf16: 8 KiB per token); on an H200 keeping them saved 0.3-0.7 ms of fwd + bwd for
# every rule at 8K and 32K tokens (GLA 8.95 against 9.46 ms, scalar decay at 32K 4.49 against 5.16). False (or
# EFFARCH_KEEP_STATES=0 at import): recompute them, for the memory.
SAVE_STATES = os.environ.get("EFFARCH_KEEP_STATES", "1") != "0"


def setting(where: str, name: str, value: str, valid: tuple[str, ...]) -> str:
    """`value` of the module setting `where`.`name`, refused in one sentence unless it is one of `valid`."""
    if value not in valid:
        raise ValueError(f"{where}.{name} is {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


def two_phase_pass(gk: int, n_sequences: int, n_chunks: int, delta: bool = False, forward: bool = False) -> bool:
    """Whether the state passes take two phases (see STATE_PASS) for decay kind `gk` (0 none, 1 scalar, 2 per
    key) of the additive rule, or of the delta rule when `delta`, over `n_chunks` chunks of `n_sequences`
    sequences; `forward`: the forward state pass (else the reverse one)."""
    if setting("launch", "STATE_PASS", STATE_PASS, ("auto", "fused", "two_phase")) != "auto":
        return STATE_PASS == "two_phase"
    long = n_chunks >= TWO_PHASE_CHUNKS * max(n_sequences, 1)
    if gk == 2 and forward:
        fwd = setting("launch", "GLA_FWD_STATE_PASS", GLA_FWD_STATE_PASS, ("auto", "fused", "two_phase"))
        return fwd == "two_phase" or fwd == "auto" and long
    return gk == 2 or (gk == 1 or delta) and long


def inverse_by_doubling() -> bool:
    return setting("launch", "DELTA_INVERSE", DELTA_INVERSE, ("substitution", "doubling")) == "doubling"


def scan_blocks(K: int, V: int, n_heads: int) -> tuple[int, int]:
    """(BK, BV) blocks of the two-phase additive pass, which takes no products: any block is right, so the state
    is cut into blocks of at most 1024 entries, and finer (down to 16 x 16) while fewer than SCAN_PROGRAMS run."""
    BK, BV = _pow2(K), min(_pow2(V), 64)
    count = lambda: n_heads * cdiv(V, BV) * cdiv(K, BK)  # noqa: E731
    while BK > 16 and (BK * BV > 1024 or count() < SCAN_PROGRAMS):
        BK //= 2
    while BV > 16 and count() < SCAN_PROGRAMS:
        BV //= 2
    return BK, BV


def chunk_terms(a, b, G, out, table: ChunkTable, chunk: int, scale: float, *, reverse: bool, dtc: int) -> None:
    """Each chunk's own term of a state pass into out [NT, H, K, V] float32 (`chunk_outer_kernel`): the state
    contribution (K e^R)^T V (a = k, b = v), or with `reverse` the gradient term scale (Q e^G)^T dO (a = q,
    b = do)."""
    _, H, K = a.shape
    V = b.shape[-1]
    BK, BV = min(_pow2(K), 64), min(_pow2(V), 64)
    nkb = cdiv(K, BK)
    fwd_kernels.chunk_outer_kernel[(table.n_chunks, nkb * cdiv(V, BV), H)](
        a, b, a if G is None else G, out, table.chunk_tok, table.chunk_eos, scale,
        H, K, V, chunk, BK, BV, nkb, gkind(G), reverse, dtc, num_warps=4,
    )  # fmt: skip


def gkind(g: torch.Tensor | None) -> int:
    return 0 if g is None else (1 if g.dim() == 2 else 2)


@dataclass
class ForwardPieces:
    """What the chunk kernels compute before the outputs; the backward recomputes them."""

    G: torch.Tensor | None  # chunk-local cumsum of g, float32
    X: torch.Tensor | None  # delta: (I + A)^{-1} of each chunk, [T, H, BT] float32
    W: torch.Tensor | None  # delta: [T, H, K]
    U: torch.Tensor | None  # delta: U~ [T, H, V]
    h: torch.Tensor  # state entering each chunk [NT, H, K, V]
    vnew: torch.Tensor | None  # delta: pseudo-values U [T, H, V]
    hT: torch.Tensor | None  # final states [N, H, K, V] float32


@dataclass
class KeptStates:
    """What a training forward keeps so that its backward forms no state pass of its own: the states entering each
    chunk, the final states (when output), for the delta rule W and the pseudo-values U, and the chunk-local decay
    cumsum G (the backward needs G, not g: kept in g's place it costs no memory and saves a pass over g)."""

    h: torch.Tensor
    hT: torch.Tensor | None
    W: torch.Tensor | None = None
    vnew: torch.Tensor | None = None
    G: torch.Tensor | None = None


def forward_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    h0: torch.Tensor | None,
    table: ChunkTable,
    chunk: int,
    *,
    delta: bool,
    store_final: bool,
    state_dtype: torch.dtype,
    X: torch.Tensor | None = None,
    states: KeptStates | None = None,
) -> ForwardPieces:
    """The chunk-local decay cumsum, the delta rule's WY pieces (the inverse X is taken as given when passed:
    the backward reuses the forward's) and the state entering each chunk. `states`: what the forward kept of
    these; neither the WY pieces nor the state pass are formed again then."""
    T, H, K = q.shape
    V = v.shape[-1]
    BK, dtc = _pow2(K), dot_code(q.dtype)
    if BK > 256:
        raise ValueError(f"key dim K = {K} is too large for the Triton kernels; valid is K <= 256")
    NT, N = table.n_chunks, table.n_seqs
    G = None if states is None else states.G
    if g is not None and G is None:
        G = _empty(*g.shape, dtype=torch.float32, device=g.device)
        fwd_kernels.chunk_cumsum_kernel[(NT, H)](
            g, G, table.chunk_tok, table.chunk_eos, H, K, chunk, BK, g.dim() == 3, num_warps=4
        )
    if states is not None:
        if store_final and states.hT is None or delta and (states.W is None or states.vnew is None):
            raise ValueError("kept states lack the final states or the delta rule's W and pseudo-values")
        return ForwardPieces(G, X, states.W, None, states.h, states.vnew, states.hT if store_final else None)
    W = U = vnew = None
    if delta:
        have_x = X is not None
        if not have_x:
            X = _empty(T, H, chunk, dtype=torch.float32, device=q.device)
        W, U = _empty_like(k), _empty_like(v)
        fwd_kernels.delta_prep_kernel[(NT, H)](
            k, v, beta, q if G is None else G, X, W, U, table.chunk_tok, table.chunk_eos,
            H, K, V, chunk, SUBBLOCK, BK, min(_pow2(V), 64), G is not None, have_x, dtc,
            DELTA_PREP_IN_REGS and chunk == 4 * SUBBLOCK, inverse_by_doubling(),
            num_warps=DELTA_PREP_WARPS,
        )  # fmt: skip
        vnew = _empty_like(v)
    h = _empty(NT, H, K, V, dtype=state_dtype, device=q.device)
    hT = _empty(N, H, K, V, dtype=torch.float32, device=q.device) if store_final else None
    dummy = q
    two_phase = two_phase_pass(gkind(g), N, NT, forward=True) and not delta
    D = dummy
    if two_phase:  # each chunk's term first (into h itself when it is float32), then decay and add
        D = h if state_dtype == torch.float32 else _empty(NT, H, K, V, dtype=torch.float32, device=q.device)
        chunk_terms(k, v, G, D, table, chunk, 1.0, reverse=False, dtc=dtc)
        BKs, BV = scan_blocks(K, V, N * H)
    else:
        BKs, BV = state_blocks(K, V, N * H, split=g is not None and not delta)
    fwd_kernels.state_fwd_kernel[(cdiv(V, BV), cdiv(K, BKs), N * H)](
        k, v, dummy if W is None else W, dummy if U is None else U, dummy if G is None else G, h,
        dummy if h0 is None else h0, dummy if hT is None else hT, dummy if vnew is None else vnew, D,
        table.cu, table.seq_chunk, H, K, V, chunk, BKs, BV, gkind(g), delta, h0 is not None, store_final, dtc,
        two_phase, num_warps=STATE_FWD_WARPS, num_stages=STATE_FWD_STAGES,
    )  # fmt: skip
    return ForwardPieces(G, X, W, U, h, vnew, hT)


def gla_scores(q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, table: ChunkTable, chunk: int) -> torch.Tensor:
    """Per-key decay's intra-chunk scores A [T, H, chunk] float32 (`gla_intra_kernel`)."""
    T, H, K = q.shape
    BK = _pow2(K)
    A = _empty(T, H, chunk, dtype=torch.float32, device=q.device)
    fwd_kernels.gla_intra_kernel[(table.n_chunks * (chunk // SUBBLOCK), H)](
        q, k, G, A, table.chunk_tok, table.chunk_eos, H, K, chunk, SUBBLOCK,
        BK if GLA_INTRA_BK == 0 else min(BK, GLA_INTRA_BK), dot_code(q.dtype), num_warps=4,
    )  # fmt: skip
    return A


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    h0: torch.Tensor | None,
    table: ChunkTable,
    chunk: int,
    scale: float,
    *,
    delta: bool,
    store_final: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """o [T, H, V] in v's dtype, the final states (or None), what the backward reuses rather than recompute
    (the delta rule's inverses X, or the per-key decay's intra-chunk scores A; None otherwise) and the pieces
    the backward could keep (`KeptStates`)."""
    T, H, K = q.shape
    V = v.shape[-1]
    state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    p = forward_pieces(q, k, v, g, beta, h0, table, chunk, delta=delta, store_final=store_final,
                       state_dtype=state_dtype)  # fmt: skip
    BK, dtc, NT = _pow2(K), dot_code(q.dtype), table.n_chunks
    A = gla_scores(q, k, p.G, table, chunk) if g is not None and g.dim() == 3 else None
    o = _empty_like(v)
    BV = min(_pow2(V), 64)
    fwd_kernels.out_fwd_kernel[(cdiv(V, BV), NT, H)](
        q, k, v if p.vnew is None else p.vnew, q if p.G is None else p.G, q if A is None else A, p.h, o,
        table.chunk_tok, table.chunk_eos, scale, H, K, V, chunk, BK, BV, gkind(g), dtc, num_warps=OUT_FWD_WARPS,
    )  # fmt: skip
    return o, p.hT, p.X if delta else A, KeptStates(p.h, p.hT, p.W, p.vnew, p.G)


def recurrent_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    state: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
    *,
    delta: bool,
) -> torch.Tensor:
    """Token-by-token pass over packed sequences (cu [N+1] int32); updates `state` [N, H, K, V] float32
    in place and returns o [T, H, V] in v's dtype."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    o = _empty_like(v)
    BK = _pow2(K)
    BV = min(_pow2(V), 32 if BK > 64 else 64)
    recurrent_kernel.recurrent_kernel[(cdiv(V, BV), N * H)](
        q, k, v, q if g is None else g, q if beta is None else beta, state, state, o, cu, scale,
        H, K, V, BK, BV, gkind(g), delta, True, num_warps=4,
    )  # fmt: skip
    return o
