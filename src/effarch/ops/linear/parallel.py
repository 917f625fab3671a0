"""Quadratic (attention-like) form of the linear recurrence: each block of tokens in closed form.

A block of C tokens entering with state S_0 (row convention, "Speed Always Wins" arXiv 2508.09834 sec. 2;
chunkwise form of "Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv 2312.06635,
and the WY/UT form of "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
arXiv 2406.06484). G_t = sum_{r<=t} g_r is the block-local cumulative log decay, R_t = G_C - G_t,
Gamma_ts = exp(G_t - G_s) for s <= t (elementwise over K for per-key decay), M the causal mask:

  additive: O = (Q * e^G) S_0 + ((Q K^T) * Gamma * M) V
            S_C = e^{G_C} S_0 + (K * e^R)^T V
  delta:    (I + A) [W | U~] = [diag(b e^G) K | diag(b) V],  A = strictly-lower(diag(b) (K K^T * Gamma))
            U = U~ - W S_0,  O = (Q * e^G) S_0 + ((Q K^T) * Gamma * M) U,  S_C = e^{G_C} S_0 + (K * e^R)^T U

Every exponent is a difference G_t - G_s with s <= t (masked to -inf before exp), so no exp of a positive
number is ever formed. `linear_recurrence_parallel` treats a whole sequence as one block (memory
O(T^2), O(T^2 K) for per-key decay): meant for short sequences; the chunked form builds on the same
block terms. Shape letters: B batch, T time, H heads, N blocks, C block length, K key dim, V value dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from effarch.ops.linear.checks import RecurrenceInputs, check_inputs, expand_key_heads

ScoresFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- block layout


@dataclass
class BlockGrid:
    """How [B, T, H, *] tokens are laid out as [rows, H, N, C, *] blocks.

    Without cu_seqlens: rows = B, each row cut into N blocks, the tail padded. With cu_seqlens (B = 1):
    rows = 1 and every sequence gets its own max(1, ceil(L / C)) blocks, padded at its end, so no block
    holds two sequences. Padding tokens have q = k = v = 0, beta = 0 and log decay 0: they leave the state
    unchanged, so the state after a sequence's last block is its final state (empty sequences included).
    """

    T: int
    C: int
    N: int
    rows: int
    src: torch.Tensor | None = None  # [N*C] token index feeding each block slot (T = padding); varlen only
    dest: torch.Tensor | None = None  # [T] block slot of each token; varlen only
    seq_blocks: list[tuple[int, int]] | None = None  # (first block, end block) per sequence; varlen only

    @classmethod
    def build(cls, inp: RecurrenceInputs, C: int, device: torch.device) -> BlockGrid:
        if inp.cu_seqlens is None:
            return cls(T=inp.T, C=C, N=max(1, -(-inp.T // C)), rows=inp.B)
        cu = inp.cu_seqlens.to(device=device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        n_blocks = torch.clamp(-(-lengths // C), min=1)
        first = torch.cumsum(n_blocks, 0) - n_blocks
        seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
        tokens = torch.arange(inp.T, device=device)
        dest = first[seq_of_token] * C + tokens - cu[:-1][seq_of_token]
        N = int(n_blocks.sum())
        src = torch.full((N * C,), inp.T, dtype=torch.long, device=device)
        src[dest] = tokens
        firsts, counts = first.tolist(), n_blocks.tolist()
        return cls(inp.T, C, N, 1, src, dest, [(f, f + c) for f, c in zip(firsts, counts)])

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, *] -> [rows, H, N, C, *]."""
        if self.src is None:
            pad = self.N * self.C - self.T
            if pad:
                x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1)
            x = x.reshape(self.rows, self.N, self.C, *x.shape[2:])
        else:
            x = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])]).index_select(0, self.src)
            x = x.reshape(1, self.N, self.C, *x.shape[1:])
        return x.movedim(3, 1).contiguous()  # one copy here instead of one per product below

    def tokens(self, o: torch.Tensor) -> torch.Tensor:
        """[rows, H, N, C, V] -> [B, T, H, V]."""
        H, V = o.shape[1], o.shape[-1]
        o = o.movedim(1, 3).reshape(self.rows, self.N * self.C, H, V)
        return o[:, : self.T] if self.dest is None else o.index_select(1, self.dest)


# ----------------------------------------------------------------------------- block terms


def exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """exp(x), with results below tiny^0.7 (about 3e-27 in float32, 1e-215 in float64) set to exactly 0.

    Such factors are far below the working precision, but multiplied by ordinary numbers in the matrix
    products (forward and backward) they give subnormal floats, which make CPU arithmetic tens of times
    slower. The margin below tiny keeps those products normal."""
    floor = 0.7 * math.log(torch.finfo(x.dtype).tiny)
    return x.masked_fill(x < floor, float("-inf")).exp()


def sum_after(g: torch.Tensor, dim: int) -> torch.Tensor:
    """R_t = sum_{r > t} g_r along `dim` (= G_C - G_t), summed from the end so no large G cancels."""
    n = g.shape[dim]
    tail = g.flip(dim).cumsum(dim).flip(dim).narrow(dim, 1, n - 1)
    return torch.cat([tail, torch.zeros_like(g.narrow(dim, 0, 1))], dim)


def _causal(C: int, strict: bool, device: torch.device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def decay_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None, *, strict: bool = False) -> torch.Tensor:
    """[..., C, C]: sum_c q_tc k_sc exp(G_tc - G_sc) for s <= t (s < t when strict), 0 above.

    q, k [..., C, K]; g (per-step log decay) None, [..., C] (scalar) or [..., C, K] (per key); G = cumsum(g).
    The per-key case holds [..., C (C + 1) / 2, K] tensors: fine for short blocks only.
    """
    C = q.shape[-2]
    mask = _causal(C, strict, q.device)
    if g is None:
        return (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)
    if g.dim() == q.dim() - 1:  # scalar per token
        G = g.cumsum(-1)
        gamma = exp_flushed((G[..., :, None] - G[..., None, :]).masked_fill(~mask, float("-inf")))
        return (q @ k.transpose(-1, -2)) * gamma
    # Per key: only the (t, s) pairs on and below the diagonal, so every exponent is <= 0 as computed.
    G = g.cumsum(-2)
    t, s = torch.tril_indices(C, C, offset=-1 if strict else 0, device=q.device)
    at = lambda x, i: x.index_select(-2, i)  # much faster than advanced indexing on CPU
    pairs = (at(q, t) * at(k, s) * exp_flushed(at(G, t) - at(G, s))).sum(-1)  # [..., P]
    out = pairs.new_zeros(*pairs.shape[:-1], C * C).index_copy(-1, t * C + s, pairs)
    return out.reshape(*pairs.shape[:-1], C, C)


@dataclass
class BlockTerms:
    """What a block contributes, given the state S_0 entering it ([..., K, V]):
    output  o   = o_local + q_state @ S_0          ([..., C, V])
    state   S_C = decay * S_0 + b   (additive)     decay None, [...] or [..., K]
            S_C = trans @ S_0 + b   (delta)        trans [..., K, K]
    """

    o_local: torch.Tensor
    q_state: torch.Tensor
    b: torch.Tensor
    decay: torch.Tensor | None = None
    trans: torch.Tensor | None = None

    def next_state(self, S: torch.Tensor) -> torch.Tensor:
        if self.trans is not None:
            return self.trans @ S + self.b
        if self.decay is None:
            return S + self.b
        d = self.decay
        return (d[..., None, None] if d.dim() == S.dim() - 2 else d[..., None]) * S + self.b


def block_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None,
    rule: str,
    scores: ScoresFn = decay_scores,
) -> BlockTerms:
    """Closed-form terms of blocks: q, k [..., C, K] (q already scaled), v [..., C, V], g None / [..., C] /
    [..., C, K] per-step log decay, beta [..., C] (delta). `scores` computes the masked decayed q k^T."""
    per_key = g is not None and g.dim() == q.dim()
    if rule == "delta" and per_key:
        raise NotImplementedError("rule 'delta' with per-key log_decay [B,T,H,K] has no chunked/parallel form")
    if g is None:
        q_state, k_state, decay = q, k, None
    else:
        ax = -2 if per_key else -1
        G = g.cumsum(ax)
        R = sum_after(g, ax)
        decay, eG, eR = exp_flushed(G.select(ax, -1)), exp_flushed(G), exp_flushed(R)
        if not per_key:
            eG, eR = eG[..., None], eR[..., None]
        q_state, k_state = q * eG, k * eR
    P = scores(q, k, g)  # [..., C, C]
    if rule == "additive":
        return BlockTerms(P @ v, q_state, k_state.transpose(-1, -2) @ v, decay=decay)
    # Delta: UT transform, one unit-lower-triangular solve per block for W and U~ together.
    A = beta[..., None] * decay_scores(k, k, g, strict=True)
    rhs = torch.cat([(beta[..., None] * (k if g is None else k * eG)), beta[..., None] * v], -1)
    X = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    K = k.shape[-1]
    W, U = X[..., :K], X[..., K:]
    kT = k_state.transpose(-1, -2)
    eye = torch.eye(K, dtype=k.dtype, device=k.device)
    trans = (eye if decay is None else decay[..., None, None] * eye) - kT @ W
    return BlockTerms(P @ U, q_state - P @ W, kT @ U, trans=trans)


# ----------------------------------------------------------------------------- shared preparation


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    beta: torch.Tensor | None,
    inp: RecurrenceInputs,
    grid: BlockGrid,
) -> tuple[torch.Tensor, ...]:
    """Casts to the compute dtype, scales q, broadcasts a fixed [H] decay, and lays everything out as
    blocks: q, k [rows,H,N,C,K], v [rows,H,N,C,V], g None/[rows,H,N,C]/[rows,H,N,C,K], beta [rows,H,N,C]."""
    cd = inp.compute_dtype
    g = log_decay
    if g is not None:
        g = g.to(cd)
        if g.dim() == 1:
            g = g.expand(inp.B, inp.T, inp.H)
        g = grid.blocks(g)
    b = None if beta is None else grid.blocks(beta.to(cd))
    return grid.blocks(q.to(cd) * inp.scale), grid.blocks(k.to(cd)), grid.blocks(v.to(cd)), g, b


def initial_states(initial_state: torch.Tensor | None, inp: RecurrenceInputs, device: torch.device) -> torch.Tensor:
    """[n_sequences, H, K, V] in the compute dtype (zeros when none is given)."""
    if initial_state is None:
        return torch.zeros(inp.n_sequences, inp.H, inp.K, inp.V, dtype=inp.compute_dtype, device=device)
    return initial_state.to(inp.compute_dtype)


# ----------------------------------------------------------------------------- public form


def linear_recurrence_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    rule: str = "additive",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Whole-sequence quadratic form (one block per sequence); arguments and result as
    `effarch.ops.linear.linear_recurrence`. Memory O(T^2) per head (O(T^2 K) with per-key decay)."""
    inp = check_inputs(q, k, v, log_decay, beta, rule, scale, initial_state, cu_seqlens)
    q, k = expand_key_heads(q, k, inp.H)  # key groups serve several heads
    if rule == "delta" and log_decay is not None and log_decay.dim() == 4:
        raise NotImplementedError("rule 'delta' with per-key log_decay [B,T,H,K] has no parallel form")
    if cu_seqlens is None:
        C = max(1, inp.T)
    else:
        C = max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    grid = BlockGrid.build(inp, C, q.device)
    qb, kb, vb, gb, bb = prepare(q, k, v, log_decay, beta, inp, grid)
    terms = block_terms(qb, kb, vb, gb, bb, rule)
    S0 = initial_states(initial_state, inp, q.device)  # [n_seq, H, K, V]
    # One block per sequence: rows x N blocks are B x 1 (dense) or 1 x n_seq (varlen).
    S_in = S0[:, :, None] if cu_seqlens is None else S0.transpose(0, 1)[None]
    o = grid.tokens(terms.o_local + terms.q_state @ S_in).to(v.dtype)
    if not output_final_state:
        return o, None
    S_out = terms.next_state(S_in)
    return o, (S_out[:, :, 0] if cu_seqlens is None else S_out[0].transpose(0, 1))
