"""Plain PyTorch references of the fused training parts: the specs the Triton kernels are tested against and
the path the layers take whenever the kernels are off.

RMSNorm (Root Mean Square Layer Normalization, arXiv 1910.07467), with the residual add:
    s = x + residual,   y = s / sqrt(mean(s^2) + eps) * weight   (in float32, cast back)
SwiGLU gate (GLU Variants Improve Transformer, arXiv 2002.05202):
    y = silu(a) * b
Gated per-head RMSNorm (the output stage of GLA, DeltaNet, Gated DeltaNet):
    y = norm(o) * weight * act(gate),   act = silu or sigmoid
Log-sigmoid decay (GLA's per-key gate, arXiv 2312.06635), from a 16-bit pre-activation to a float32 log decay:
    y = logsigmoid(x) / normalizer
Gated DeltaNet's gates (arXiv 2412.06464), from per-head pre-activations a, b and parameters A_log, dt_bias [H]:
    g = -exp(A_log) * softplus(a + dt_bias),   beta = beta_scale * sigmoid(b)   (float32)
Rotary embedding (RoFormer, arXiv 2104.09864), rotate-half convention, x = (x1, x2) split in halves:
    y = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
"""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., D] in float32, cast to x's dtype. With `residual` (x's shape), the sum
    s = x + residual is kept in the residual's dtype and (norm(s) in x's dtype, s) is returned."""
    if residual is not None:
        s = (x.float() + residual.float()).to(residual.dtype)
        return rms_norm_reference(s.float(), weight, eps).to(x.dtype), s
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def gated_rms_norm_reference(
    o: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    eps: float,
    activation: str = "silu",
    gate_first: bool = False,
) -> torch.Tensor:
    """RMSNorm of o [..., D] times weight [D] times silu(gate) or sigmoid(gate), in float32, cast to o's dtype;
    with `gate_first`, RMSNorm of o * act(gate) times weight (Mamba-2's gated norm)."""
    g = gate.float()
    a = torch.nn.functional.silu(g) if activation == "silu" else torch.sigmoid(g)
    if gate_first:
        return rms_norm_reference(o.float() * a, weight, eps).to(o.dtype)
    return (rms_norm_reference(o.float(), weight, eps) * a).to(o.dtype)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a, b of one shape, in (at least) float32, cast to a's dtype."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return (torch.nn.functional.silu(a.to(acc)) * b.to(acc)).to(a.dtype)


def log_sigmoid_decay_reference(x: torch.Tensor, normalizer: float) -> torch.Tensor:
    """logsigmoid(x) / normalizer in (at least) float32."""
    return torch.nn.functional.logsigmoid(x.to(torch.promote_types(x.dtype, torch.float32))) / normalizer


def delta_gates_reference(
    ab: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, beta_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) [..., H] in (at least) float32 from a, b side by side in ab [..., 2H]."""
    a, b = ab.chunk(2, dim=-1)
    acc = torch.promote_types(ab.dtype, torch.float32)
    g = -torch.exp(A_log.to(acc)) * torch.nn.functional.softplus(a.to(acc) + dt_bias.to(acc))
    beta = torch.sigmoid(b.to(acc))
    return g, (beta_scale * beta if beta_scale != 1 else beta)


def ssd_inputs_reference(
    dt: torch.Tensor, x: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's (log_decay [..., H] in (at least) float32, v = x * dt [..., H, P] in x's dtype) from the step
    pre-activations dt [..., H]: dt = softplus(dt + dt_bias), log_decay = -exp(A_log) dt."""
    acc = torch.promote_types(dt.dtype, torch.float32)
    step = torch.nn.functional.softplus(dt.to(acc) + dt_bias.to(acc))
    return -torch.exp(A_log.to(acc)) * step, (x * step[..., None]).to(x.dtype)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate all D channels of x [B, T, H, D] by angles whose cos/sin are [T, D/2] or [B, T, D/2]; computed in
    float32, cast to x's dtype."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    if cos.dim() == 2:  # [T, D/2] -> broadcast over batch and heads
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:  # [B, T, D/2]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
