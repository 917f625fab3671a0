"""The selective scan in parallel over time: an associative (Blelloch-style) scan of h_t = a_t h_{t-1} + b_t.

The pair (a, b) composes associatively: (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2). Combining
neighbouring pairs halves the sequence; the scan of the halved sequence gives the states at odd
positions, and one more step gives the even ones. Work O(T), depth O(log T), memory O(T) (no
[T, T] matrices, unlike a chunked form, which matters because Mamba's decay is per channel and per state).
Decays a = exp(dt A) stay in (0, 1] for A < 0, so the products cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from effarch.ops.scan.checks import check_scan_inputs, finish_output, prepare_dt


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t with h_{-1} = 0, elementwise, along dim 1; a, b [B, T, ...]."""
    T = b.shape[1]
    if T == 1:
        return b
    odd = T % 2
    if odd:  # pad with the identity pair (a = 1, b = 0) so neighbours pair up
        pad = [0, 0] * (b.dim() - 2) + [0, 1]
        a, b = F.pad(a, pad, value=1.0), F.pad(b, pad)
    a_e, a_o, b_e, b_o = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    h_o = linear_scan(a_e * a_o, a_o * b_e + b_o)  # states at positions 1, 3, 5, ...
    h_e = torch.cat([b_e[:, :1], a_e[:, 1:] * h_o[:, :-1] + b_e[:, 1:]], dim=1)  # positions 0, 2, 4, ...
    h = torch.stack([h_e, h_o], dim=2).flatten(1, 2)
    return h[:, :T] if odd else h


def _expand_groups(M: torch.Tensor, G: int, D: int) -> torch.Tensor:
    """B or C [Bs, T, N] or [Bs, T, G, N] -> broadcastable against [Bs, T, G, D/G, N]."""
    if M.dim() == 3:
        return M[:, :, None, None, :]
    return M[:, :, :, None, :]


def _scan_core(step, x, A, B, C, h0, cu_seqlens, G):
    """y = C h (no skip, no gate) [Bs, T, D] and each sequence's last state [N_seq, D, N]."""
    Bs, T, Dc = x.shape
    N = A.shape[1]
    a = torch.exp(step[..., None] * A)  # [Bs, T, D, N]
    u = (step * x).view(Bs, T, G, Dc // G, 1)
    b = (u * _expand_groups(B, G, Dc)).reshape(Bs, T, Dc, N)
    if cu_seqlens is None:
        if h0 is not None:
            b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], dim=1)
    else:
        # A new document forgets the previous one (a = 0 at its first token) and starts from its own state.
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        nonempty = starts < ends
        keep = torch.ones(T, dtype=x.dtype, device=x.device)
        keep[starts[nonempty]] = 0.0
        if h0 is not None:
            idx = starts[nonempty]
            inject = torch.zeros(T, Dc, N, dtype=x.dtype, device=x.device).index_add(0, idx, a[0, idx] * h0[nonempty])
            b = b + inject[None]
        a = a * keep[None, :, None, None]
    h = linear_scan(a, b)  # [Bs, T, D, N]
    y = (h.view(Bs, T, G, Dc // G, N) * _expand_groups(C, G, Dc)).sum(-1).reshape(Bs, T, Dc)
    if cu_seqlens is None:
        return y, h[:, -1]
    last = h[0, (ends - 1).clamp_min(0)]
    fallback = h0 if h0 is not None else torch.zeros_like(last)
    return y, torch.where((ends == starts)[:, None, None], fallback, last)


def selective_scan_parallel(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same result as `selective_scan_reference`, computed with `linear_scan` over [B, T, D, N] tensors."""
    inp = check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    cd, Bs, T, Dc, N, G = inp.compute_dtype, inp.batch, inp.T, inp.D, inp.N, inp.G
    step = prepare_dt(dt, dt_bias, dt_softplus, cd)  # [Bs, T, D]
    if T == 0:
        y = torch.zeros(Bs, 0, Dc, dtype=cd, device=x.device)
        final = None
        if output_final_state:
            final = initial_state.to(cd) if initial_state is not None else x.new_zeros(inp.n_sequences, Dc, N, dtype=cd)
        return finish_output(y, x, D, z, cd), final
    args = (step, x.to(cd), A.to(cd), B.to(cd), C.to(cd), None if initial_state is None else initial_state.to(cd))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        # Recompute the [B, T, D, N] tensors in backward instead of keeping several of them per layer
        # for autograd: a layer then holds only its [B, T, D]-sized inputs.
        y, final = checkpoint(_scan_core, *args, cu_seqlens, G, use_reentrant=False)
    else:
        y, final = _scan_core(*args, cu_seqlens, G)
    if not output_final_state:
        final = None
    return finish_output(y, x, D, z, cd), final
