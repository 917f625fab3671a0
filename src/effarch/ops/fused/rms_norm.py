"""RMSNorm fused with the residual add, forward and backward as Triton kernels (Root Mean Square Layer
Normalization, arXiv 1910.07467).

x, residual: [..., D] (D <= 8192); weight: [D] or None. With a residual, s = x + residual (kept in the
residual's dtype, returned as the new residual stream); without, s = x. Then, in float32,
    y = s * rstd * weight,   rstd = 1 / sqrt(mean(s^2) + eps),
cast to x's dtype. Backward, with g = dy * weight and s_hat = s * rstd:
    ds = rstd * (g - s_hat * mean(g * s_hat)) (+ d new_residual),   d weight = sum over rows of dy * s_hat,
and dx = d residual = ds.
"""

from __future__ import annotations

import torch

from effarch.layers.norm import rms_norm as _layer_rms_norm
from effarch.ops.fused import HAS_TRITON, empty_like, use_triton

MAX_D = 8192
BWD_PROGRAMS = 1024  # backward programs at most: enough to fill a GPU, few d weight partials to sum

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_fwd(X, R, W, Y, S, RSTD, D, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        # One row per program: the whole row sits in registers, so it is read once.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        s = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(R + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            # Normalise the rounded sum, the very residual stream handed to the next layer.
            s = s.to(S.dtype.element_ty)
            tl.store(S + row * D + cols, s, mask=mask)
            s = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / D + eps)
        y = s * rstd
        if HAS_W:
            y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd(S, W, RSTD, DY, DS_IN, DX, DR, DW_PART, N, D, ROWS_PER_PROG,
                 HAS_DS_IN: tl.constexpr, HAS_DR: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # Each program walks a contiguous run of rows and keeps its share of d weight in registers, written
        # once as a partial sum (summed on the host): no atomics, so the result is deterministic.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * ROWS_PER_PROG
        for i in range(0, ROWS_PER_PROG):
            row = (start + i).to(tl.int64)
            if row < N:
                s = tl.load(S + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                s_hat = s * rstd
                g = dy
                if HAS_W:
                    g = dy * w
                    dw += dy * s_hat
                ds = rstd * (g - s_hat * (tl.sum(g * s_hat, axis=0) / D))
                if HAS_DS_IN:
                    ds += tl.load(DS_IN + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * D + cols, ds.to(DX.dtype.element_ty), mask=mask)
                if HAS_DR:
                    tl.store(DR + row * D + cols, ds.to(DR.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(DW_PART + pid * D + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The spec: the layer's float32 RMSNorm, after the residual add when a residual is given."""
    if residual is None:
        return _layer_rms_norm(x, weight, eps)
    s = (x.float() + residual.float()).to(residual.dtype)
    return _layer_rms_norm(s.float(), weight, eps).to(x.dtype), s


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps: float):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        N = x2.shape[0]
        r2 = residual.reshape(-1, D).contiguous() if residual is not None else None
        w = weight.contiguous() if weight is not None else None
        y = empty_like(x2)
        s = empty_like(r2) if r2 is not None else None
        rstd = empty_like(x2[:, 0], dtype=torch.float32)
        block = triton.next_power_of_2(D)
        if N:
            _rms_fwd[(N,)](x2, r2, w, y, s, rstd, D, eps, HAS_RES=r2 is not None, HAS_W=w is not None,
                           BLOCK=block, num_warps=_num_warps(block))  # fmt: skip
        ctx.save_for_backward(s if s is not None else x2, w, rstd)
        ctx.has_res, ctx.x_dtype, ctx.shape = residual is not None, x.dtype, shape
        y = y.reshape(shape)
        if residual is None:
            return y
        return y, s.reshape(shape)

    @staticmethod
    def backward(ctx, dy, ds_in=None):
        s, w, rstd = ctx.saved_tensors
        N, D = s.shape
        dy = dy.reshape(N, D).contiguous()
        ds_in = ds_in.reshape(N, D).contiguous() if ds_in is not None else None
        dx = empty_like(s, dtype=ctx.x_dtype)
        dr = empty_like(s) if ctx.has_res and ctx.needs_input_grad[2] else None
        block = triton.next_power_of_2(D)
        n_prog = max(1, min(N, BWD_PROGRAMS))
        rows = triton.cdiv(N, n_prog) if N else 0
        n_prog = triton.cdiv(N, rows) if N else 0
        dw_part = torch.empty(n_prog, D, dtype=torch.float32, device=s.device) if w is not None else None
        if N:
            _rms_bwd[(n_prog,)](s, w, rstd, dy, ds_in, dx, dr, dw_part, N, D, rows, HAS_DS_IN=ds_in is not None,
                                HAS_DR=dr is not None, HAS_W=w is not None, BLOCK=block,
                                num_warps=_num_warps(block))  # fmt: skip
        dw = None
        if w is not None and ctx.needs_input_grad[1]:
            dw = (dw_part.sum(0) if N else torch.zeros(D, device=s.device)).to(w.dtype)
        dx = dx.reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        dr = dr.reshape(ctx.shape) if dr is not None else None
        return dx, dw, dr, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., D] (of x + residual when given, then returning (y, new_residual)); see the module."""
    D = x.shape[-1]
    if weight is not None and weight.shape != (D,):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, but it must be ({D},) for x of shape {tuple(x.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, but it must have x's shape {tuple(x.shape)}")
    tensors = [t for t in (x, weight, residual) if t is not None]
    if not use_triton(backend, *tensors):
        return rms_norm_reference(x, weight, eps, residual)
    if D > MAX_D:
        if backend == "triton":
            raise ValueError(f"x has last dimension {D}, but the Triton kernel supports at most {MAX_D}")
        return rms_norm_reference(x, weight, eps, residual)
    return _RMSNorm.apply(x, weight, residual, float(eps))
