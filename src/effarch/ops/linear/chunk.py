"""Chunked form of the linear recurrence: parallel inside chunks of C tokens, recurrent across chunks.

Cost O(T C K + T K V) per head ("Gated Linear Attention Transformers with Hardware-Efficient Training",
arXiv 2312.06635; delta rule: "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", arXiv 2406.06484; gated: "Gated Delta Networks", arXiv 2412.06464). Every chunk's closed-form
terms (`parallel.block_terms`) are computed for all chunks at once; only the [K, V] state is carried
from chunk to chunk:  S_in[n+1] = decay_n * S_in[n] + b_n  (additive)  or  trans_n @ S_in[n] + b_n  (delta),
then O_n = o_local_n + q_state_n @ S_in[n]. Log decays are summed within each chunk only, so their
exponents stay bounded however long the sequence. Per-key decay never forms a [C, C, K] tensor: chunks
are cut into sub-blocks (see `subblock_scores`). Shape letters as in parallel.py.
"""

from __future__ import annotations

import torch

from effarch.ops.linear.checks import check_inputs, expand_key_heads
from effarch.ops.linear.parallel import (
    BlockGrid,
    BlockTerms,
    block_terms,
    decay_scores,
    exp_flushed,
    initial_states,
    prepare,
    sum_after,
)

SUBBLOCK = 8  # sub-block length for per-key decay; the [c, c, K] diagonal tensors stay small


def _subblock_size(C: int) -> int:
    return max(c for c in range(1, min(SUBBLOCK, C) + 1) if C % c == 0)


def subblock_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None, *, strict: bool = False) -> torch.Tensor:
    """`decay_scores` for chunks of length C, with per-key decay computed on sub-blocks of c tokens.

    Diagonal sub-blocks use exponent differences directly. For a query t in sub-block i and a key s in an
    earlier sub-block j, the decay is split at the boundaries between them:
        exp(G_t - G_s) = exp(G_t - G_{start_i}) * exp(G_{start_i} - G_{end_j}) * exp(G_{end_j} - G_s),
    all three exponents <= 0 and each summed directly over its own tokens (no cancellation). The first
    depends on t only, the last on s only and the middle is one [K] vector per sub-block pair, so the
    off-diagonal part is one [c, K] x [K, c] product per pair with no [C, C, K] tensor.
    """
    if g is None or g.dim() != q.dim():
        return decay_scores(q, k, g, strict=strict)
    *lead, C, K = q.shape
    c = _subblock_size(C)
    if c == C:
        return decay_scores(q, k, g, strict=strict)
    n = C // c
    qs, ks, gs = (x.reshape(*lead, n, c, K) for x in (q, k, g))
    diag = decay_scores(qs, ks, gs, strict=strict)  # [..., n, c, c]
    q_in = qs * exp_flushed(gs.cumsum(-2))  # decay from the start of its sub-block to t
    k_out = ks * exp_flushed(sum_after(gs, -2))  # decay from s to the end of its sub-block
    # mid[i, j] = sum of the sub-block totals strictly between j and i, for j < i: the running sum over i
    # of total_{i-1} (kept where j < i - 1), so each is summed directly, never as a difference.
    total = gs.sum(-2)  # [..., n, K]
    prev = torch.cat([torch.zeros_like(total[..., :1, :]), total[..., :-1, :]], -2)  # total of sub-block i-1
    ones = torch.ones(n, n, dtype=torch.bool, device=q.device)
    mid = prev[..., :, None, :].masked_fill(~ones.tril(-2)[..., None], 0.0).cumsum(-3)  # [..., n(i), n(j), K]
    mid = exp_flushed(mid.masked_fill(~ones.tril(-1)[..., None], float("-inf")))
    # x[j, i, t] = q_in[i, t] * mid[i, j], so that one product per j covers every query sub-block i.
    x = q_in[..., None, :, :, :] * mid.transpose(-3, -2)[..., :, :, None, :]  # [..., n(j), n(i), c, K]
    off = x.reshape(*lead, n, n * c, K) @ k_out.transpose(-1, -2)  # [..., n(j), n(i) * c, c(s)]
    off = off.reshape(*lead, n, n, c, c).movedim(-4, -2)  # [..., n(i), c(t), n(j), c(s)]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)
    return (off + diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*lead, C, C)


def _scan(terms: BlockTerms, S0: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering every chunk, S_in [rows, H, N, K, V], and each sequence's final state [n_seq, H, K, V]."""
    b = terms.b.unbind(2)
    decay = None if terms.decay is None else terms.decay.unbind(2)
    trans = None if terms.trans is None else terms.trans.unbind(2)
    if grid.seq_blocks is None:
        starts, ends = {0: S0}, {}
    else:  # packed sequences: reset the state where each one starts, keep it where each one ends
        starts = {first: S0[i : i + 1] for i, (first, _) in enumerate(grid.seq_blocks)}
        ends = {end - 1: i for i, (_, end) in enumerate(grid.seq_blocks)}
    S, S_in, finals = S0, [], [None] * S0.shape[0]
    for n in range(grid.N):
        S = starts.get(n, S)
        S_in.append(S)
        step = BlockTerms(None, None, b[n], None if decay is None else decay[n], None if trans is None else trans[n])
        S = step.next_state(S)
        if n in ends:
            finals[ends[n]] = S[0]
    final = S if grid.seq_blocks is None else torch.stack(finals)
    return torch.stack(S_in, 2), final


def linear_recurrence_chunked(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel form; arguments and result as `effarch.ops.linear.linear_recurrence`, plus
    `chunk_size` C (tokens per chunk). Computes in float32 (float64 for float64 inputs); differentiable
    by autograd. Rule "delta" with per-key decay raises NotImplementedError."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    inp = check_inputs(q, k, v, log_decay, beta, rule, scale, initial_state, cu_seqlens)
    q, k = expand_key_heads(q, k, inp.H)  # key groups serve several heads
    if rule == "delta" and log_decay is not None and log_decay.dim() == 4:
        raise NotImplementedError("rule 'delta' with per-key log_decay [B,T,H,K] has no chunked form")
    grid = BlockGrid.build(inp, chunk_size, q.device)
    qb, kb, vb, gb, bb = prepare(q, k, v, log_decay, beta, inp, grid)
    terms = block_terms(qb, kb, vb, gb, bb, rule, scores=subblock_scores)
    S_in, final = _scan(terms, initial_states(initial_state, inp, q.device), grid)
    o = grid.tokens(terms.o_local + terms.q_state @ S_in).to(v.dtype)
    return o, (final if output_final_state else None)
