"""The selective scan (Mamba's S6), one token at a time: the spec the parallel form is tested against.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752), per channel d and
state n:  h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d],
          y_t[d]   = sum_n C_t[n] h_t[d,n] + D[d] x_t[d],   times silu(z_t[d]) when z is given.
Computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from effarch.ops.scan.checks import check_scan_inputs, finish_output, prepare_dt


def _per_channel(M: torch.Tensor, G: int, D: int) -> torch.Tensor:
    """B or C at one token, [N] or [G, N] -> [D, N] (group g serves channels g*D/G .. (g+1)*D/G - 1)."""
    if M.dim() == 1:
        return M[None, :].expand(D, -1)
    return M.repeat_interleave(D // G, dim=0)


def selective_scan_reference(
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
    """Token-by-token loop; see `effarch.ops.scan.selective_scan` for the arguments."""
    inp = check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    cd = inp.compute_dtype
    step = prepare_dt(dt, dt_bias, dt_softplus, cd)
    Af = A.to(cd)
    y = torch.zeros(inp.batch, inp.T, inp.D, dtype=cd, device=x.device)
    finals = []
    for i, (b, start, end) in enumerate(inp.segments()):
        h = (
            initial_state[i].to(cd).clone()
            if initial_state is not None
            else torch.zeros(inp.D, inp.N, dtype=cd, device=x.device)
        )
        for t in range(start, end):
            Bt = _per_channel(B[b, t].to(cd), inp.G, inp.D)
            Ct = _per_channel(C[b, t].to(cd), inp.G, inp.D)
            d = step[b, t][:, None]  # [D, 1]
            h = torch.exp(d * Af) * h + d * Bt * x[b, t].to(cd)[:, None]
            y[b, t] = (Ct * h).sum(-1)
        finals.append(h)
    final = torch.stack(finals) if output_final_state else None
    return finish_output(y, x, D, z, cd), final
