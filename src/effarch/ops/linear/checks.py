"""Argument validation shared by every form of the linear recurrence: one clear sentence per mistake."""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULES = ("additive", "delta")


@dataclass
class RecurrenceInputs:
    B: int
    T: int
    H: int
    K: int
    V: int
    scale: float
    log_decay: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    compute_dtype: torch.dtype

    @property
    def n_sequences(self) -> int:
        return self.B if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def segments(self) -> list[tuple[int, int, int]]:
        """(batch row, start, end) of each independent sequence."""
        if self.cu_seqlens is None:
            return [(b, 0, self.T) for b in range(self.B)]
        bounds = self.cu_seqlens.tolist()
        return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def expand_key_heads(q: torch.Tensor, k: torch.Tensor, heads: int, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k with fewer heads than v (key groups, as Mamba2's B and C: group g serves the heads g*H/G ..
    (g+1)*H/G - 1) repeated to `heads` along `dim`; unchanged when they already have that many."""
    if q.shape[dim] == heads:
        return q, k
    group = heads // q.shape[dim]
    return q.repeat_interleave(group, dim=dim), k.repeat_interleave(group, dim=dim)


def check_inputs(q, k, v, log_decay, beta, rule, scale, initial_state, cu_seqlens) -> RecurrenceInputs:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"linear_recurrence expects q, k [B,T,H,K] and v [B,T,H,V]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape or v.shape[:2] != q.shape[:2] or v.shape[2] % max(q.shape[2], 1):
        raise ValueError(
            f"linear_recurrence: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
            "(q and k alike; their heads equal v's or divide them, as key groups)"
        )
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[-1]
    if rule not in RULES:
        raise ValueError(f"linear_recurrence rule {rule!r} is not one of {RULES}")
    if log_decay is not None and tuple(log_decay.shape) not in ((H,), (B, T, H), (B, T, H, K)):
        raise ValueError(
            f"log_decay has shape {tuple(log_decay.shape)}; valid are [H]={H}, [B,T,H]={(B, T, H)} "
            f"or [B,T,H,K]={(B, T, H, K)}"
        )
    if rule == "delta":
        if beta is None or tuple(beta.shape) != (B, T, H):
            got = None if beta is None else tuple(beta.shape)
            raise ValueError(f"rule 'delta' needs beta of shape [B,T,H]={(B, T, H)}; got {got}")
    elif beta is not None:
        raise ValueError("beta is only used by rule 'delta'; pass rule='delta' or drop beta")
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
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    return RecurrenceInputs(B, T, H, K, V, K**-0.5 if scale is None else scale, log_decay, cu_seqlens, cd)
