"""The generalised delta rule of RWKV-7: a vector decay plus a rank-1 state-dependent update, per head.

"RWKV-7 "Goose" with Expressive Dynamic State Evolution" (arXiv 2503.14456) writes the state in column
form, S^c_t in R^{V x K}:

    S^c_t = S^c_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t,        read-out  o_t^T = S^c_t q_t^T

(RWKV-7 uses a = -kappa_hat, b = kappa_hat * a_icl: the removal key and the in-context learning rate).
We keep the library's row convention S_t = (S^c_t)^T in R^{K x V} (`effarch.ops.linear`), so

    S_t = (diag(w_t) + b_t^T a_t) S_{t-1} + k_t^T v_t,            o_t = scale * q_t S_t,

i.e. S_t = diag(w_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t, with w_t = exp(log_decay_t).

Shapes: q, k, a, b, log_decay [B,T,H,K]; v [B,T,H,V]; state [N,H,K,V] float32 (float64 for float64
inputs), N = B or the number of sequences in `cu_seqlens`. Two forms: a token loop (the spec) and a
chunked form (`generalized_delta_rule_chunked`) derived below it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

BACKENDS = ("auto", "reference", "torch")


def _segments(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def check_generalized_delta_inputs(q, k, v, a, b, log_decay, initial_state, cu_seqlens) -> torch.dtype:
    """Validate shapes; returns the compute dtype (float64 for float64 inputs, else float32)."""
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"generalized_delta_rule expects q, k, a, b, log_decay [B,T,H,K] and v [B,T,H,V]; got q {tuple(q.shape)}, "
            f"v {tuple(v.shape)}"
        )
    for name, t in (("k", k), ("a", a), ("b", b), ("log_decay", log_decay)):
        if t is None or t.shape != q.shape:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"generalized_delta_rule: {name} has shape {got}; it must match q {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"generalized_delta_rule: v {tuple(v.shape)} does not match q {tuple(q.shape)} in [B,T,H]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs the packed batch flattened to B = 1; got B = {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0, end at T = {T} and be non-decreasing")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n, H, K, V):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; expected [N,H,K,V]={(n, H, K, V)}")
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def generalized_delta_rule_reference(
    q, k, v, a, b, *, log_decay, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token loop; see `generalized_delta_rule` for the arguments."""
    cd = check_generalized_delta_inputs(q, k, v, a, b, log_decay, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    o = torch.zeros(B, T, H, V, dtype=cd, device=q.device)
    finals = []
    for n, (row, start, end) in enumerate(_segments(B, T, cu_seqlens)):
        S = initial_state[n].to(cd).clone() if initial_state is not None else q.new_zeros(H, K, V, dtype=cd)
        for t in range(start, end):
            qt, kt, vt, at, bt = (x[row, t].to(cd) for x in (q, k, v, a, b))
            wt = log_decay[row, t].to(cd).exp()
            removed = torch.einsum("hk,hkv->hv", at, S)  # a_t S_{t-1}: what the transition's rank-1 part reads
            S = wt[..., None] * S + torch.einsum("hk,hv->hkv", bt, removed) + torch.einsum("hk,hv->hkv", kt, vt)
            o[row, t] = scale * torch.einsum("hk,hkv->hv", qt, S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final


# Chunked form. Inside a chunk of L tokens (local t = 1..L, S_0 the state entering it), with the
# inclusive cumulative log decay G_t = sum_{r<=t} log w_r (G_0 = 0) and u_t = a_t S_{t-1}:
#   S_t = diag(e^{G_t}) S_0 + sum_{s<=t} diag(e^{G_t - G_s}) (b_s^T u_s + k_s^T v_s)
#   u_t = (a_t * e^{G_{t-1}}) S_0 + sum_{s<t} <a_t e^{G_{t-1}-G_s}, b_s> u_s + <a_t e^{G_{t-1}-G_s}, k_s> v_s
# so (I - P_ab) U = Abar S_0 + P_ak V, a unit lower-triangular system: U = W S_0 + U_k with
# W = (I - P_ab)^{-1} Abar and U_k = (I - P_ab)^{-1} P_ak V, computed for every chunk at once. Only the
# K x K / K x V chunk-to-chunk map S_L = M S_0 + R runs sequentially. Exponent differences are formed
# pairwise ([L, L, K]) so strong decays cannot overflow.


def _chunk_terms(q, k, v, a, b, g, scale):
    """Per-chunk quantities, inputs [X, L, K] / [X, L, V] with X = batch * heads * chunks."""
    L = q.shape[1]
    G = g.cumsum(1)  # [X, L, K] inclusive
    G_prev = G - g  # G_{t-1}
    diff_inc = G[:, :, None, :] - G[:, None, :, :]  # [X, t, s, K]: G_t - G_s
    diff_exc = G_prev[:, :, None, :] - G[:, None, :, :]  # G_{t-1} - G_s
    incl = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    e_inc = torch.where(incl[..., None], diff_inc, float("-inf")).exp()
    e_exc = torch.where(strict[..., None], diff_exc, float("-inf")).exp()
    P_ab = torch.einsum("xtk,xtsk,xsk->xts", a, e_exc, b)
    P_ak = torch.einsum("xtk,xtsk,xsk->xts", a, e_exc, k)
    Q_b = torch.einsum("xtk,xtsk,xsk->xts", q, e_inc, b) * scale
    Q_k = torch.einsum("xtk,xtsk,xsk->xts", q, e_inc, k) * scale
    eye = torch.eye(L, dtype=q.dtype, device=q.device)
    T_inv_rhs = torch.cat([a * G_prev.exp(), P_ak @ v], dim=-1)  # [X, L, K + V]
    sol = torch.linalg.solve_triangular(eye - P_ab, T_inv_rhs, upper=False, unitriangular=True)
    W, U_k = sol[..., : a.shape[-1]], sol[..., a.shape[-1] :]
    G_last = G[:, -1:]  # [X, 1, K]
    to_end = (G_last - G).exp()  # e^{G_L - G_s}
    b_end, k_end = b * to_end, k * to_end
    M = torch.diag_embed(G_last[:, 0].exp()) + b_end.transpose(1, 2) @ W  # [X, K, K]
    R = b_end.transpose(1, 2) @ U_k + k_end.transpose(1, 2) @ v  # [X, K, V]
    q_in = q * G.exp() * scale  # reads S_0 through the decay so far
    return W, U_k, M, R, q_in, Q_b, Q_k


def _chunked_rows(q, k, v, a, b, g, scale, S0, chunk_size):
    """Chunked form for full rows: inputs [B,T,H,*] in the compute dtype, S0 [B,H,K,V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    L = chunk_size
    pad = (-T) % L
    if pad:  # zero keys, removal vectors and log decays leave the state untouched
        q, k, a, b, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, a, b, g))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
    n = (T + pad) // L

    def chunks(x):  # [B, T, H, D] -> [B*H*n, L, D]
        return x.view(B, n, L, H, x.shape[-1]).permute(0, 3, 1, 2, 4).reshape(B * H * n, L, x.shape[-1])

    args = [chunks(x) for x in (q, k, v, a, b, g)]
    if torch.is_grad_enabled() and any(x.requires_grad for x in args):
        # Recompute the [L, L, K] decay tensors in backward rather than keep them for every chunk.
        terms = checkpoint(_chunk_terms, *args, scale, use_reentrant=False)
    else:
        terms = _chunk_terms(*args, scale)
    W, U_k, M, R, q_in, Q_b, Q_k = terms
    M, R = M.view(B, H, n, K, K), R.view(B, H, n, K, V)
    starts = []
    S = S0
    for c in range(n):
        starts.append(S)
        S = M[:, :, c] @ S + R[:, :, c]
    S_in = torch.stack(starts, dim=2).reshape(B * H * n, K, V)
    U = W @ S_in + U_k  # [X, L, V]
    o = q_in @ S_in + Q_b @ U + Q_k @ chunks(v)
    o = o.view(B, H, n, L, V).permute(0, 2, 3, 1, 4).reshape(B, n * L, H, V)[:, :T]
    return o, S


def generalized_delta_rule_chunked(
    q,
    k,
    v,
    a,
    b,
    *,
    log_decay,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form of `generalized_delta_rule_reference` (same arguments, plus `chunk_size`)."""
    cd = check_generalized_delta_inputs(q, k, v, a, b, log_decay, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size} must be a positive number of tokens")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    xs = [x.to(cd) for x in (q, k, v, a, b, log_decay)]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    S0 = initial_state.to(cd) if initial_state is not None else q.new_zeros(n_seq, H, K, V, dtype=cd)
    if cu_seqlens is None:
        o, final = _chunked_rows(*xs, scale, S0, chunk_size) if T else (xs[2], S0)
    else:
        outs, finals = [], []
        for i, (_, start, end) in enumerate(_segments(B, T, cu_seqlens)):
            if end > start:
                o_i, f_i = _chunked_rows(*(x[:, start:end] for x in xs), scale, S0[i : i + 1], chunk_size)
                outs.append(o_i)
                finals.append(f_i)
            else:
                finals.append(S0[i : i + 1])
        o = torch.cat(outs, dim=1) if outs else xs[2]
        final = torch.cat(finals)
    return o.to(v.dtype), (final if output_final_state else None)


def generalized_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    log_decay: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = (diag(exp(log_decay_t)) + b_t^T a_t) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t (row form).

    RWKV-7 (arXiv 2503.14456) generalised delta rule; `a`, `b` are the paper's (column-form) a_t, b_t.
    q, k, a, b, log_decay [B,T,H,K]; v [B,T,H,V]; scale defaults to K**-0.5 (RWKV-7 itself uses 1);
    initial_state / final state [N,H,K,V] float32 (float64 for float64 inputs); cu_seqlens int64 [N+1]
    with B = 1 for packed sequences. backend: "reference" (token loop), "torch" (chunked), "auto"
    (the loop for a few tokens, as in decoding; the chunked form otherwise).
    Returns (o [B,T,H,V] in v's dtype, final state or None).
    """
    if backend not in BACKENDS:
        raise ValueError(f"generalized_delta_rule backend {backend!r} is not one of {BACKENDS}")
    kwargs = dict(
        log_decay=log_decay,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if backend == "reference" or (backend == "auto" and q.shape[1] <= 2):
        return generalized_delta_rule_reference(q, k, v, a, b, **kwargs)
    return generalized_delta_rule_chunked(q, k, v, a, b, **kwargs)
