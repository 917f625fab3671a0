"""Rotary position embeddings applied in one Triton pass, forward and backward (RoFormer: Enhanced
Transformer with Rotary Position Embedding, arXiv 2104.09864), rotate-half convention.

x: [B, T, H, D] with D even; cos, sin: [T, D/2] or [B, T, D/2]. With x = (x1, x2) split in halves,
    y = (x1 * cos - x2 * sin, x2 * cos + x1 * sin),
in float32, cast to x's dtype. A rotation is orthogonal, so the backward is the rotation by -angle:
    dx = (dy1 * cos + dy2 * sin, dy2 * cos - dy1 * sin).
"""

from __future__ import annotations

import torch

from effarch.layers.rotary import apply_rotary as _layer_apply_rotary
from effarch.ops.fused import HAS_TRITON, empty_like, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate(X, COS, SIN, Y, T, H, HALF, stride_cb, stride_ct, SIGN: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
        # One (batch, token) per program: its cos/sin row is loaded once and used for every head.
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // T, pid % T
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < H) & (cols < HALF)
        c = tl.load(COS + b * stride_cb + t * stride_ct + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * stride_cb + t * stride_ct + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        s = s * SIGN  # SIGN = -1 rotates by -angle (the backward)
        base = pid * H * 2 * HALF + heads * 2 * HALF + cols
        x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + base + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + base, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + base + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The spec: the layer's rotary embedding over all D channels."""
    return _layer_apply_rotary(x, cos, sin)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    y = empty_like(x)
    if x.numel():
        # cos/sin as [B, T, D/2] views; a [T, D/2] table gets batch stride 0.
        stride_cb, stride_ct = cos.stride(0), cos.stride(1)
        _rotate[(B * T,)](x, cos, sin, y, T, H, D // 2, stride_cb, stride_ct, SIGN=sign,
                          BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(D // 2))  # fmt: skip
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        B, T, _, D = x.shape
        x = x.contiguous()
        ctx.table_dtype = cos.dtype
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        cos_v = cos if cos.dim() == 3 else cos[None].expand(B, T, D // 2)
        sin_v = sin if sin.dim() == 3 else sin[None].expand(B, T, D // 2)
        ctx.save_for_backward(x, cos, sin)
        return _launch(x, cos_v, sin_v, 1.0)

    @staticmethod
    def backward(ctx, dy):
        x, cos, sin = ctx.saved_tensors
        B, T, _, D = x.shape
        cos_v = cos if cos.dim() == 3 else cos[None].expand(B, T, D // 2)
        sin_v = sin if sin.dim() == 3 else sin[None].expand(B, T, D // 2)
        dx = _launch(dy.contiguous(), cos_v, sin_v, -1.0) if ctx.needs_input_grad[0] else None
        dcos = dsin = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Tables are usually fixed; when they do need a gradient it is a plain reduction over heads (and
            # batch for a [T, D/2] table), left to PyTorch.
            xf, dyf = x.float(), dy.float()
            x1, x2 = xf.chunk(2, dim=-1)
            d1, d2 = dyf.chunk(2, dim=-1)
            dims = (2,) if cos.dim() == 3 else (0, 2)
            dcos = (d1 * x1 + d2 * x2).sum(dims)
            dsin = (d2 * x1 - d1 * x2).sum(dims)
            dcos, dsin = dcos.to(ctx.table_dtype), dsin.to(ctx.table_dtype)
        return dx, dcos, dsin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Rotate all D channels of x [B, T, H, D] by the angles whose cos/sin are [T, D/2] or [B, T, D/2]."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x has shape {tuple(x.shape)}, but it must be [B, T, H, D] with D even")
    B, T, _, D = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape not in ((T, D // 2), (B, T, D // 2)):
            raise ValueError(
                f"{name} has shape {tuple(table.shape)}, but it must be ({T}, {D // 2}) or ({B}, {T}, {D // 2})"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)}, but it must have cos's shape {tuple(cos.shape)}")
    if not use_triton(backend, x):
        return apply_rotary_reference(x, cos, sin)
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"cos/sin are on {cos.device}/{sin.device}, but they must be on x's device {x.device}")
    return _Rotary.apply(x, cos, sin)
