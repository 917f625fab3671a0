"""The selective scan of Mamba (S6) behind one call, dispatching between the step loop and the parallel scan."""

from __future__ import annotations

import torch

from effarch.ops.scan.parallel import selective_scan_parallel
from effarch.ops.scan.reference import selective_scan_reference

BACKENDS = ("auto", "reference", "torch")


def selective_scan(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selective state-space scan, "Mamba" (arXiv 2312.00752), per channel d and state n:

        h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d]
        y_t[d]   = sum_n C_t[n] h_t[d,n] + D[d] x_t[d],  times silu(z_t[d]) when z is given,

    with dt replaced by softplus(dt + dt_bias) when `dt_softplus` (dt + dt_bias otherwise).

    x, dt, z [B,T,D]; A [D,N] (negative for a decaying state); B, C [B,T,N], or [B,T,G,N] with group g
    shared by channels g*D/G .. (g+1)*D/G - 1; D, dt_bias [D]; initial_state / final state [N_seq,D,N]
    in float32 (float64 for float64 inputs), N_seq = B or the number of sequences in `cu_seqlens`
    (int64 [N_seq+1], packed sequences with B = 1). Returns (y [B,T,D] in x's dtype, final state or None).
    backend: "reference" (step loop), "torch" (parallel associative scan), "auto" (= "torch").
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan backend {backend!r} is not one of {BACKENDS}")
    kwargs = dict(
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if backend == "reference":
        return selective_scan_reference(x, dt, A, B, C, D, z, **kwargs)
    return selective_scan_parallel(x, dt, A, B, C, D, z, **kwargs)
