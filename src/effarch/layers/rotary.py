"""Rotary position embeddings (RoFormer, arXiv 2104.09864), rotate-half convention, [B, T, H, D] layout; on CUDA
the fused Triton kernel applies them when `effarch.ops.fused.enabled` says so."""

from __future__ import annotations

import torch

from effarch.ops import fused
from effarch.ops.fused.reference import apply_rotary_reference


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, dim // 2] for integer positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of x [B, T, H, D]; cos/sin [T, R/2] or [B, T, R/2]."""
    r = rotary_dim or x.shape[-1]
    xr = x[..., :r]  # the kernel reads this slice in place
    if fused.enabled(x.device, x.dtype):
        out = fused.apply_rotary(xr, cos, sin, backend="triton")
    else:
        out = apply_rotary_reference(xr, cos, sin)
    return torch.cat([out, x[..., r:]], dim=-1) if r < x.shape[-1] else out


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token inside its own document, [total]."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:], idx, right=True)
    return idx - cu_seqlens[doc]
