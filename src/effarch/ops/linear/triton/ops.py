"""The Triton linear recurrence as torch.library custom ops (with fake implementations, so torch.compile
traces through them) and the public entry points built on them."""

from __future__ import annotations

import torch
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.grid import dense_offsets
from effarch.ops.linear.checks import check_inputs, expand_key_heads
from effarch.ops.linear.triton import launch
from effarch.ops.linear.triton.backward import chunk_backward
from effarch.ops.linear.triton.launch import KeptStates, chunk_forward, kernel_build_options, recurrent_forward
from effarch.ops.linear.triton.layout import ChunkTable

CHUNK = 64  # tokens per chunk
RECURRENT_MAX_T = 16  # without gradients, sequences up to this length run token by token (decoding)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def chunk_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    h0: Tensor | None,
    cu: Tensor,
    scale: float,
    delta: bool,
    dense_len: int,
    chunk: int,
    store_final: bool,
    keep_states: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Packed q, k [T,H,K], v [T,H,V], g None/[T,H]/[T,H,K] float32, beta [T,H], h0 [N,H,K,V] float32,
    cu [N+1] int32 -> (o [T,H,V], final state [N,H,K,V] float32 or an empty tensor, float32 [T,H,C] that
    the backward reuses: the delta rule's inverses or the per-key decay's intra-chunk scores, else empty, and with
    `keep_states` on a dense batch the states entering each chunk [NT,H,K,V], for the delta rule W [T,H,K] and
    the pseudo-values [T,H,V], and with a decay its chunk-local cumsum G (g's shape, float32), each else empty)."""
    table = ChunkTable.build(cu, dense_len, chunk)
    q, k = expand_key_heads(q, k, v.shape[1], dim=1)  # key groups: the copies live only during the call
    with kernel_build_options(q.shape[-1], v.shape[-1]):
        o, hT, saved, kept = chunk_forward(
            q, k, v, g, beta, h0, table, chunk, scale, delta=delta, store_final=store_final
        )
    keep = keep_states and dense_len > 0  # dense: the chunks' count is known without the lengths (fake shapes)
    pieces = [kept.h, kept.W, kept.vnew, kept.G] if keep else [None] * 4
    return o, *(x if x is not None else _empty(q) for x in (hT, saved, *pieces))


chunk_fwd_op_call = KernelCall("effarch::linear_recurrence_chunk_fwd", chunk_fwd)
chunk_fwd_op = chunk_fwd_op_call.op


@chunk_fwd_op.register_fake
def _(q, k, v, g, beta, h0, cu, scale, delta, dense_len, chunk, store_final, keep_states=False):
    n, K, (T, H, V) = cu.shape[0] - 1, q.shape[-1], v.shape
    final = q.new_empty(n, H, K, V, dtype=torch.float32) if store_final else _empty(q)
    keeps = delta or (g is not None and g.dim() == 3)
    saved = q.new_empty(T, H, chunk, dtype=torch.float32) if keeps else _empty(q)
    states, w, vnew, G = _empty(q), _empty(q), _empty(q), _empty(q)
    if keep_states and dense_len > 0:
        if g is not None:
            G = torch.empty_like(g, dtype=torch.float32)
        state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        states = q.new_empty(n * -(-dense_len // chunk), H, K, V, dtype=state_dtype)
        if delta:
            w, vnew = q.new_empty(T, H, K), torch.empty_like(v)
    return torch.empty_like(v), final, saved, states, w, vnew, G


def chunk_bwd(
    do: Tensor,
    dhT: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    h0: Tensor | None,
    saved: Tensor,
    cu: Tensor,
    scale: float,
    delta: bool,
    dense_len: int,
    chunk: int,
    states: Tensor | None = None,
    final: Tensor | None = None,
    w: Tensor | None = None,
    vnew: Tensor | None = None,
    g_cumsum: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg, dbeta, dh0); the last three are empty when g, beta or h0 is None. `saved` is the
    forward's third output; `states`, `w`, `vnew` its fourth to sixth and `final` its second when it kept them;
    `g_cumsum`: g is the forward's kept cumsum G (its seventh output) in place of the log decay."""
    table = ChunkTable.build(cu, dense_len, chunk)
    given = lambda x: x if x is not None and x.numel() else None  # noqa: E731
    if g_cumsum and given(states) is None:
        raise ValueError("g_cumsum=True needs the forward's kept states")
    kept = None
    if given(states) is not None:
        kept = KeptStates(states, given(final), given(w), given(vnew), g if g_cumsum else None)
    with kernel_build_options(q.shape[-1], v.shape[-1]):
        dq, dk, dv, dg, dbeta, dh0 = chunk_backward(
            do, dhT, q, k, v, g, beta, h0, saved if saved.numel() else None, table, chunk, scale, dense_len,
            delta=delta, states=kept,
        )  # fmt: skip
    return (
        dq,
        dk,
        dv,
        dg if g is not None else _empty(q),
        dbeta if beta is not None else _empty(q),
        dh0 if h0 is not None else _empty(q),
    )


chunk_bwd_op_call = KernelCall("effarch::linear_recurrence_chunk_bwd", chunk_bwd)
chunk_bwd_op = chunk_bwd_op_call.op


@chunk_bwd_op.register_fake
def _(do, dhT, q, k, v, g, beta, h0, saved, cu, scale, delta, dense_len, chunk, states=None, final=None, w=None,
      vnew=None, g_cumsum=False):  # fmt: skip
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(g) if g is not None else _empty(q),
        torch.empty_like(beta) if beta is not None else _empty(q),
        torch.empty_like(h0) if h0 is not None else _empty(q),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, h0, cu, scale, delta, dense_len, chunk, store_final, *_ = inputs
    G = output[6]
    ctx.g_cumsum = G.numel() > 0  # the kept cumsum saved in g's place (the backward needs G only)
    ctx.save_for_backward(q, k, v, G if ctx.g_cumsum else g, beta, h0, cu, output[2], output[1], *output[3:6])
    ctx.mark_non_differentiable(*output[2:])
    # No zero tensors for the outputs kept for the backward alone (the chunk states: hundreds of MB a layer), nor
    # for an unused final state: each would be one more launch and a memset.
    ctx.set_materialize_grads(False)
    ctx.args = (scale, delta, dense_len, chunk)


def _backward(ctx, do, dhT, *_kept):
    q, k, v, g, beta, h0, cu, saved, final, states, w, vnew = ctx.saved_tensors
    scale, delta, dense_len, chunk = ctx.args
    dhT = dhT.contiguous() if dhT is not None and dhT.numel() > 0 else None  # may arrive expanded (stride 0)
    groups = q.shape[1]
    qe, ke = expand_key_heads(q, k, v.shape[1], dim=1)
    do = torch.zeros_like(v) if do is None else do.contiguous()  # only the final state had a gradient
    dq, dk, dv, dg, dbeta, dh0 = chunk_bwd_op_call(
        do,
        dhT,
        qe,
        ke,
        v,
        g,
        beta,
        h0,
        saved,
        cu,
        scale,
        delta,
        dense_len,
        chunk,
        states,
        final,
        w,
        vnew,
        ctx.g_cumsum,
    )
    if groups != v.shape[1]:  # a key group's gradient sums over the heads it serves
        dq, dk = (x.unflatten(1, (groups, -1)).sum(2, dtype=torch.float32).to(x.dtype) for x in (dq, dk))
    return (
        dq,
        dk,
        dv,
        dg if g is not None else None,
        dbeta if beta is not None else None,
        dh0 if h0 is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


chunk_fwd_op_call.differentiable(_setup_context, _backward)


def recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor | None,
    state: Tensor,
    cu: Tensor,
    scale: float,
    delta: bool,
) -> Tensor:
    """Packed tokens through the recurrence one by one; `state` [N,H,K,V] float32 is updated in place."""
    with kernel_build_options(q.shape[-1], v.shape[-1]):
        return recurrent_forward(q, k, v, g, beta, state, cu, scale, delta=delta)


recurrent_op_call = KernelCall("effarch::linear_recurrence_step", recurrent, ("state",))
recurrent_op = recurrent_op_call.op


@recurrent_op.register_fake
def _(q, k, v, g, beta, state, cu, scale, delta):
    return torch.empty_like(v)


def _packed(q, k, v, log_decay, beta, inp):
    """[B,T,...] inputs as packed [B*T, ...] contiguous tensors of q's dtype; log decay as float32."""
    B, T, H = q.shape[0], q.shape[1], v.shape[2]
    flat = lambda x: x.reshape(B * T, *x.shape[2:]).contiguous()
    g = log_decay
    if g is not None:
        g = g.float()
        if g.dim() == 1:
            g = g.expand(B, T, H)
        g = flat(g)
    return flat(q), flat(k.to(q.dtype)), flat(v.to(q.dtype)), g, None if beta is None else flat(beta)


def _cu(q: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, int]:
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return dense_offsets(B, T, q.device, torch.int32), T
    return cu_seqlens.to(device=q.device, dtype=torch.int32), 0


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def linear_recurrence_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    rule: str = "additive",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Triton form of `effarch.ops.linear.linear_recurrence` (same arguments and result): chunked kernels
    (chunks of 64 tokens) with autograd, or the token-by-token kernel for short inputs without gradients
    and for the delta rule with per-key decay."""
    inp = check_inputs(q, k, v, log_decay, beta, rule, scale, initial_state, cu_seqlens)
    B, T, H = q.shape[0], q.shape[1], v.shape[2]
    qp, kp, vp, g, bp = _packed(q, k, v, log_decay, beta, inp)
    cu, dense_len = _cu(q, cu_seqlens)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    delta = rule == "delta"
    per_key_delta = delta and g is not None and g.dim() == 3
    grad = _needs_grad(q, k, v, log_decay, beta, initial_state)
    if per_key_delta and grad:
        raise NotImplementedError("rule 'delta' with per-key log_decay has no Triton backward")
    if per_key_delta or (T <= RECURRENT_MAX_T and not grad):
        qp, kp = expand_key_heads(qp, kp, H, dim=1)
        state = h0.clone() if h0 is not None else q.new_zeros(inp.n_sequences, H, inp.K, inp.V, dtype=torch.float32)
        o = recurrent_op_call(qp, kp, vp, g, bp, state, cu, inp.scale, delta)
        final = state if output_final_state else None
    else:
        keep = launch.SAVE_STATES and grad
        o, final, *_ = chunk_fwd_op_call(
            qp, kp, vp, g, bp, h0, cu, inp.scale, delta, dense_len, CHUNK, output_final_state, keep
        )
        final = final if output_final_state else None
    return o.reshape(B, T, H, inp.V).to(v.dtype), final


def linear_recurrence_step_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    *,
    log_decay: Tensor | None = None,
    beta: Tensor | None = None,
    rule: str = "additive",
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Decoding step(s): runs q, k, v [B,T,H,*] through the recurrence from `state` [N,H,K,V] float32
    (contiguous), which is updated in place; returns o [B,T,H,V]. No gradients."""
    inp = check_inputs(q, k, v, log_decay, beta, rule, scale, state, cu_seqlens)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous float32 tensor; got {state.dtype}, contiguous={state.is_contiguous()}"
        )
    B, T, H = q.shape[0], q.shape[1], v.shape[2]
    qp, kp, vp, g, bp = _packed(q, k, v, log_decay, beta, inp)
    qp, kp = expand_key_heads(qp, kp, H, dim=1)
    cu, _ = _cu(q, cu_seqlens)
    o = recurrent_op_call(qp, kp, vp, g, bp, state, cu, inp.scale, rule == "delta")
    return o.reshape(B, T, H, inp.V).to(v.dtype)
