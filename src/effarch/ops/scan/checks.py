"""Argument validation for the selective scan: one clear sentence per mistake."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScanInputs:
    batch: int
    T: int
    D: int
    N: int
    G: int  # groups of B/C; each group is shared by D // G channels
    cu_seqlens: torch.Tensor | None
    compute_dtype: torch.dtype

    @property
    def n_sequences(self) -> int:
        return self.batch if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def segments(self) -> list[tuple[int, int, int]]:
        """(batch row, start, end) of each independent sequence."""
        if self.cu_seqlens is None:
            return [(b, 0, self.T) for b in range(self.batch)]
        bounds = self.cu_seqlens.tolist()
        return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _shape(t: torch.Tensor | None):
    return None if t is None else tuple(t.shape)


def check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens) -> ScanInputs:
    if x.dim() != 3:
        raise ValueError(f"selective_scan expects x of shape [B,T,D]; got {_shape(x)}")
    Bsz, T, Dc = x.shape
    if tuple(dt.shape) != (Bsz, T, Dc):
        raise ValueError(f"selective_scan: dt has shape {_shape(dt)}; it must match x {(Bsz, T, Dc)}")
    if A.dim() != 2 or A.shape[0] != Dc:
        raise ValueError(f"selective_scan: A has shape {_shape(A)}; expected [D,N] with D = {Dc}")
    N = A.shape[1]
    if B.shape != C.shape:
        raise ValueError(f"selective_scan: B {_shape(B)} and C {_shape(C)} must have the same shape")
    if B.dim() == 3 and tuple(B.shape) == (Bsz, T, N):
        G = 1
    elif B.dim() == 4 and tuple(B.shape[:2]) == (Bsz, T) and B.shape[3] == N and B.shape[2] >= 1:
        G = B.shape[2]
        if Dc % G:
            raise ValueError(f"selective_scan: D = {Dc} channels cannot be split into G = {G} groups of B/C")
    else:
        raise ValueError(f"selective_scan: B and C have shape {_shape(B)}; expected [B,T,N]={(Bsz, T, N)} or [B,T,G,N]")
    if D is not None and tuple(D.shape) != (Dc,):
        raise ValueError(f"selective_scan: D has shape {_shape(D)}; expected [D]=({Dc},)")
    if z is not None and tuple(z.shape) != (Bsz, T, Dc):
        raise ValueError(f"selective_scan: z has shape {_shape(z)}; it must match x {(Bsz, T, Dc)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (Dc,):
        raise ValueError(f"selective_scan: dt_bias has shape {_shape(dt_bias)}; expected [D]=({Dc},)")
    if cu_seqlens is not None:
        if Bsz != 1:
            raise ValueError(f"cu_seqlens needs the packed batch flattened to B = 1; got B = {Bsz}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0, end at T = {T} and be non-decreasing")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    n = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n, Dc, N):
        raise ValueError(f"selective_scan: initial_state has shape {_shape(initial_state)}; expected {(n, Dc, N)}")
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ScanInputs(Bsz, T, Dc, N, G, cu_seqlens, cd)


def prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool, cd: torch.dtype) -> torch.Tensor:
    """The step actually used: softplus(dt + dt_bias) when `dt_softplus`, else dt + dt_bias."""
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    return torch.nn.functional.softplus(dt) if dt_softplus else dt


def finish_output(y, x, D, z, cd) -> torch.Tensor:
    """y + D x, gated by silu(z) when z is given, cast to x's dtype."""
    if D is not None:
        y = y + D.to(cd) * x.to(cd)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(cd))
    return y.to(x.dtype)
