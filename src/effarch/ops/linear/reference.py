"""The unified linear recurrence, step by step: the spec every faster form is tested against.

Per head, state S_t [K, V] (row convention, "Speed Always Wins" arXiv 2508.09834 sec. 2):
  additive: S_t = D_t S_{t-1} + k_t^T v_t
  delta:    S_t = D_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t
  output:   o_t = scale * q_t S_t,    D_t = diag(exp(log_decay_t))
Computed in float32 (or float64 when the inputs are float64) one token at a time.
"""

from __future__ import annotations

import torch

from effarch.ops.linear.checks import RecurrenceInputs, check_inputs, expand_key_heads


def _decay_at(inp: RecurrenceInputs, b: int, t: int) -> torch.Tensor | None:
    """exp(log_decay) at token t as [H, K, 1] (broadcast over V), or None."""
    g = inp.log_decay
    if g is None:
        return None
    if g.dim() == 1:  # [H]
        d = g[:, None]
    elif g.dim() == 3:  # [B, T, H]
        d = g[b, t][:, None]
    else:  # [B, T, H, K]
        d = g[b, t]
    return d.to(inp.compute_dtype).exp().expand(inp.H, inp.K)[..., None]


def linear_recurrence_reference(
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
    """Token-by-token loop; see `effarch.ops.linear.linear_recurrence` for the arguments."""
    inp = check_inputs(q, k, v, log_decay, beta, rule, scale, initial_state, cu_seqlens)
    q, k = expand_key_heads(q, k, inp.H)  # key groups serve several heads
    cd = inp.compute_dtype
    o = torch.empty(q.shape[0], q.shape[1], inp.H, inp.V, dtype=cd, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(inp.segments()):
        S = (
            initial_state[n].to(cd).clone()
            if initial_state is not None
            else torch.zeros(inp.H, inp.K, inp.V, dtype=cd, device=q.device)
        )
        for t in range(start, end):
            qt, kt, vt = q[b, t].to(cd), k[b, t].to(cd), v[b, t].to(cd)  # [H, K], [H, K], [H, V]
            d = _decay_at(inp, b, t)
            if rule == "delta":
                bt = beta[b, t].to(cd)[:, None]  # [H, 1]
                # (I - b k^T k) S = S - k^T (b k S): remove what the memory predicted for k_t.
                S = S - torch.einsum("hk,hv->hkv", kt, bt * torch.einsum("hk,hkv->hv", kt, S))
                if d is not None:
                    S = d * S
                S = S + torch.einsum("hk,hv->hkv", kt, bt * vt)
            else:
                if d is not None:
                    S = d * S
                S = S + torch.einsum("hk,hv->hkv", kt, vt)
            o[b, t] = inp.scale * torch.einsum("hk,hkv->hv", qt, S)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None  # float32 (float64 for float64 inputs)
    return o.to(v.dtype), final
