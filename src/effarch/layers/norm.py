"""RMSNorm (Root Mean Square Layer Normalization, arXiv 1910.07467), computed in float32; on CUDA the fused
Triton kernel (with the residual add folded in) runs it when `effarch.ops.fused.enabled` says so."""

from __future__ import annotations

import torch
from torch import nn

from effarch.layers.recompute import recomputed
from effarch.ops import fused
from effarch.ops.fused.reference import rms_norm_reference


def _fused(x: torch.Tensor) -> bool:
    return fused.enabled(x.device, x.dtype) and x.shape[-1] <= fused.RMS_NORM_MAX_D


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, in float32, cast back to x's dtype."""
    if _fused(x):
        return fused.rms_norm(x, weight, eps, backend="triton")
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step: s = residual + x, then (rms_norm(s), s); one kernel when fused.

    The sum takes the wider of the two dtypes, as `residual + x` would (a bfloat16 branch added to a float32
    residual stream under autocast keeps the stream in float32).
    """
    if _fused(x) and _fused(residual):
        dtype = torch.promote_types(x.dtype, residual.dtype)
        return fused.rms_norm(x.to(dtype), weight, eps, residual.to(dtype), backend="triton")
    s = residual + x
    return rms_norm(s, weight, eps), s


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x) [..., dim]; with `residual`, (norm(residual + x), residual + x) (see `add_rms_norm`)."""
        if residual is not None:
            return add_rms_norm(x, residual, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Output normalisation with a gate: y = RMSNorm(x) * act(g), per head (as in GLA, Mamba2, GDN)."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu"):
        super().__init__()
        if activation not in ("silu", "sigmoid"):
            raise ValueError(f"gate activation {activation!r} is not one of 'silu', 'sigmoid'")
        self.eps, self.activation = eps, activation
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return recomputed(self._gated, x, gate)

    def _gated(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        g = torch.nn.functional.silu(gate.float()) if self.activation == "silu" else torch.sigmoid(gate.float())
        return (rms_norm(x, self.weight, self.eps).float() * g).to(x.dtype)
