"""Rotary position embeddings (RoFormer, arXiv 2104.09864), rotate-half convention, [B, T, H, D] layout."""

from __future__ import annotations

import torch


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, dim // 2] for integer positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of x [B, T, H, D]; cos/sin [T, R/2] or [B, T, R/2]."""
    r = rotary_dim or x.shape[-1]
    xr, xp = x[..., :r].float(), x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    if cos.dim() == 2:  # [T, R/2] -> broadcast over batch and heads
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, R/2]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([out, xp], dim=-1) if r < x.shape[-1] else out


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token inside its own document, [total]."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:], idx, right=True)
    return idx - cu_seqlens[doc]
