"""Rotary position embeddings applied in one Triton pass, forward and backward, wrapped as a torch.library
custom op (RoFormer: Enhanced Transformer with Rotary Position Embedding, arXiv 2104.09864), rotate-half
convention.

x: [B, T, H, D] with D even (any strides but the last, so slices such as k out of a joint kv projection or
the first channels of a partial rotary are read in place); cos, sin: [T, D/2] or [B, T, D/2]. With x = (x1, x2)
split in halves,
    y = (x1 * cos - x2 * sin, x2 * cos + x1 * sin),
in float32, cast to x's dtype (y is contiguous). A rotation is orthogonal, so the backward is the rotation
by -angle:
    dx = (dy1 * cos + dy2 * sin, dy2 * cos - dy1 * sin).
"""

from __future__ import annotations

from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.fused import HAS_TRITON, empty_like, use_triton
from effarch.ops.fused.reference import apply_rotary_reference
from effarch.ops.grid import next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate(X, COS, SIN, Y, T, H, HALF, stride_xb, stride_xt, stride_xh, stride_cb, stride_ct,
                SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
        # One (batch, token) per program: its cos/sin row is loaded once and used for every head.
        pid = tl.program_id(0).to(tl.int64)
        b, t = pid // T, pid % T
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < H) & (cols < HALF)
        c = tl.load(COS + b * stride_cb + t * stride_ct + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        s = tl.load(SIN + b * stride_cb + t * stride_ct + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        s = s * SIGN  # SIGN = -1 rotates by -angle (the backward)
        src = b * stride_xb + t * stride_xt + heads * stride_xh + cols
        x1 = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = pid * H * 2 * HALF + heads * 2 * HALF + cols
        tl.store(Y + dst, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + dst + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """x [B, T, H, D] (unit channel stride), cos/sin [T, D/2] or [B, T, D/2] float32 contiguous -> y [B, T, H, D]
    contiguous, rotated by +angle (sign 1) or -angle (sign -1)."""
    B, T, H, D = x.shape
    y = empty_like(x, shape=x.shape)
    if x.numel():
        # A [T, D/2] table is read with batch stride 0.
        stride_cb, stride_ct = (cos.stride(0), cos.stride(1)) if cos.dim() == 3 else (0, cos.stride(0))
        _rotate[(B * T,)](x, cos, sin, y, T, H, D // 2, x.stride(0), x.stride(1), x.stride(2), stride_cb, stride_ct,
                          SIGN=sign, BLOCK_H=next_power_of_2(H),
                          BLOCK_HALF=next_power_of_2(D // 2))  # fmt: skip
    return y


_rotary_op_call = KernelCall("effarch::fused_rotary", _rotary)
_rotary_op = _rotary_op_call.op


@_rotary_op.register_fake
def _(x, cos, sin, sign):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    x, cos, sin, _ = inputs
    ctx.table_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(x if ctx.table_grad else None, cos, sin)


def _backward(ctx, dy):
    x, cos, sin = ctx.saved_tensors
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = _rotary_op_call(dy, cos, sin, -1.0)
    dcos = dsin = None
    if ctx.table_grad:
        # Tables are usually fixed; when they do need a gradient it is a plain reduction over heads (and
        # batch for a [T, D/2] table), left to PyTorch.
        x1, x2 = x.float().chunk(2, dim=-1)
        d1, d2 = dy.float().chunk(2, dim=-1)
        dims = (2,) if cos.dim() == 3 else (0, 2)
        dcos, dsin = (d1 * x1 + d2 * x2).sum(dims), (d2 * x1 - d1 * x2).sum(dims)
    return dx, dcos, dsin, None


_rotary_op_call.differentiable(_setup, _backward)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, backend: str = "auto") -> Tensor:
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
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _rotary_op_call(x, cos.float().contiguous(), sin.float().contiguous(), 1.0)
