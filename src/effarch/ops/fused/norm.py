"""RMSNorm fused with the residual add, forward and backward as Triton kernels wrapped as torch.library custom
ops (Root Mean Square Layer Normalization, arXiv 1910.07467).

x, residual: [..., D] (D <= 8192); weight: [D] or None. With a residual, s = x + residual (kept in the
residual's dtype, returned as the new residual stream); without, s = x. Then, in float32,
    y = s * rstd * weight,   rstd = 1 / sqrt(mean(s^2) + eps),
cast to x's dtype. Backward, with g = dy * weight and s_hat = s * rstd:
    ds = rstd * (g - s_hat * mean(g * s_hat)) (+ d new_residual),   d weight = sum over rows of dy * s_hat,
and dx = d residual = ds. Shape letters: N rows (all leading dimensions), D channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.fused import HAS_TRITON, RMS_NORM_MAX_D, empty_like, use_triton
from effarch.ops.fused.reference import rms_norm_reference
from effarch.ops.grid import cdiv, next_power_of_2
from effarch.ops.partials import sum_partials

MAX_D = RMS_NORM_MAX_D
BWD_PROGRAMS = 1024  # backward programs at most: enough to fill a GPU, few d weight partials to sum
# Elements per forward program: rows of D <= PACKED_MAX_D go FWD_TILE / D to a program (0: one row each). With one
# row each, the per-head norms of q and k (D = 128, 196K rows at 32K tokens and 6 heads) ran as 196K one-warp
# programs at about half the copy bandwidth on an H200. BWD_TILE likewise for the backward, whose programs
# (BWD_PROGRAMS at most) walk their rows ROWS = BWD_TILE / D at a time instead of one by one. Training on an H200
# (bf16, 8K x 4, each step replayed from a CUDA graph) with 4096 / 2048 for rows of every width: Gated DeltaNet
# 129.5 -> 132.5 thousand tokens/s, GLA 176.3 -> 175.5 (its rows of the model width, 1024, packed four to a
# program), so only short rows are packed.
FWD_TILE = 4096
BWD_TILE = 2048
PACKED_MAX_D = 512


def _rows_per_program(tile: int, block: int) -> int:
    return max(1, tile // block) if block <= PACKED_MAX_D else 1


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_fwd(X, R, W, Y, S, RSTD, N, D, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr,
                 ROWS: tl.constexpr):  # fmt: skip
        # ROWS rows per program, each whole in registers, so it is read once.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        rmask = rows < N
        mask = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        s = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
            # Normalise the rounded sum, the very residual stream handed to the next layer.
            s = s.to(S.dtype.element_ty)
            tl.store(S + off, s, mask=mask)
            s = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=1) / D + eps)
        y = s * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_bwd(S, W, RSTD, DY, DS_IN, DX, DR, DW_PART, N, D, ROWS_PER_PROG,
                 HAS_DS_IN: tl.constexpr, HAS_DR: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr,
                 BLOCK: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        # Each program walks a contiguous run of rows, ROWS at a time, and keeps its share of d weight in
        # registers, written once as a partial sum (summed on the host): no atomics, so the result is deterministic.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < D
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * ROWS_PER_PROG
        for i in range(0, ROWS_PER_PROG, ROWS):
            k = i + tl.arange(0, ROWS)
            rows = start + k
            rmask = (k < ROWS_PER_PROG) & (rows < N)
            mask = rmask[:, None] & cmask[None, :]
            off = rows[:, None] * D + cols[None, :]
            s = tl.load(S + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
            s_hat = s * rstd
            g = dy
            if HAS_W:
                g = dy * w
                if WANT_DW:
                    dw += dy * s_hat
            ds = rstd * (g - s_hat * (tl.sum(g * s_hat, axis=1) / D)[:, None])
            if HAS_DS_IN:
                ds += tl.load(DS_IN + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + off, ds.to(DX.dtype.element_ty), mask=mask)
            if HAS_DR:
                tl.store(DR + off, ds.to(DR.dtype.element_ty), mask=mask)
        if WANT_DW:
            tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def _none(like: Tensor) -> Tensor:
    """The empty tensor a custom op returns in place of an absent output."""
    return like.new_empty(0)


def _fwd(x: Tensor, weight: Tensor | None, residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual [N, D] contiguous, weight [D] -> (y [N, D] in x's dtype, s [N, D] in the residual's dtype
    (empty without a residual), rstd [N] float32)."""
    N, D = x.shape
    y = empty_like(x)
    s = empty_like(residual) if residual is not None else None
    rstd = empty_like(x[:, 0], dtype=torch.float32)
    block = next_power_of_2(D)
    rows = _rows_per_program(FWD_TILE, block)
    if N:
        _rms_fwd[(cdiv(N, rows),)](x, residual, weight, y, s, rstd, N, D, eps, HAS_RES=residual is not None,
                                   HAS_W=weight is not None, BLOCK=block, ROWS=rows,
                                   num_warps=_num_warps(rows * block))  # fmt: skip
    return y, (s if s is not None else _none(x)), rstd


_fwd_op_call = KernelCall("effarch::fused_rms_norm_fwd", _fwd)
_fwd_op = _fwd_op_call.op


@_fwd_op.register_fake
def _(x, weight, residual, eps):
    s = torch.empty_like(residual) if residual is not None else _none(x)
    return torch.empty_like(x), s, x.new_empty(x.shape[0], dtype=torch.float32)


def _bwd(
    s: Tensor, weight: Tensor | None, rstd: Tensor, dy: Tensor, ds_in: Tensor | None, want_dr: bool, want_dw: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """s, dy, ds_in [N, D] contiguous -> (dx [N, D] in dy's dtype, d weight [D] (empty unless a weight and
    `want_dw`), d residual [N, D] in s's dtype (empty unless `want_dr`))."""
    want_dw = want_dw and weight is not None
    N, D = s.shape
    dx = empty_like(s, dtype=dy.dtype)
    dr = empty_like(s) if want_dr else None
    block = next_power_of_2(D)
    tile_rows = _rows_per_program(BWD_TILE, block)
    n_prog = max(1, min(N, BWD_PROGRAMS))
    rows = cdiv(N, n_prog) if N else 0
    n_prog = cdiv(N, rows) if N else 0
    dw_part = torch.empty(n_prog, D, dtype=torch.float32, device=s.device) if want_dw else None
    if N:
        _rms_bwd[(n_prog,)](s, weight, rstd, dy, ds_in, dx, dr, dw_part, N, D, rows, HAS_DS_IN=ds_in is not None,
                            HAS_DR=dr is not None, HAS_W=weight is not None, WANT_DW=want_dw, BLOCK=block,
                            ROWS=tile_rows, num_warps=_num_warps(tile_rows * block))  # fmt: skip
    dw = _none(s)
    if want_dw:
        dw = sum_partials(dw_part, weight.dtype)
    return dx, dw, (dr if dr is not None else _none(s))


_bwd_op_call = KernelCall("effarch::fused_rms_norm_bwd", _bwd)
_bwd_op = _bwd_op_call.op


@_bwd_op.register_fake
def _(s, weight, rstd, dy, ds_in, want_dr, want_dw):
    dw = torch.empty_like(weight) if weight is not None and want_dw else _none(s)
    return torch.empty_like(dy), dw, (torch.empty_like(s) if want_dr else _none(s))


def _setup_context(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zero tensors (one launch each) for rstd, or s without a gradient
    ctx.has_res, ctx.y_dtype = residual is not None, x.dtype
    ctx.want_dr = ctx.has_res and ctx.needs_input_grad[2]
    ctx.want_dw = weight is not None and ctx.needs_input_grad[1]  # not for a constant weight (unit_heads)
    ctx.save_for_backward(s if ctx.has_res else x, weight, rstd)


def _backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds_in = ds.contiguous() if ctx.has_res and ds is not None else None
    dy = torch.zeros_like(s, dtype=ctx.y_dtype) if dy is None else dy.contiguous()  # only s had a gradient
    dx, dw, dr = _bwd_op_call(s, weight, rstd, dy, ds_in, ctx.want_dr, ctx.want_dw)
    return dx, (dw if ctx.want_dw else None), (dr if ctx.want_dr else None), None


_fwd_op_call.differentiable(_setup_context, _backward)


def rms_norm(
    x: Tensor, weight: Tensor | None, eps: float, residual: Tensor | None = None, *, backend: str = "auto"
) -> Tensor | tuple[Tensor, Tensor]:
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
    shape = x.shape
    r2 = residual.reshape(-1, D).contiguous() if residual is not None else None
    w = weight.contiguous() if weight is not None else None
    y, s, _ = _fwd_op_call(x.reshape(-1, D).contiguous(), w, r2, float(eps))
    if residual is None:
        return y.reshape(shape)
    return y.reshape(shape), s.reshape(shape)
