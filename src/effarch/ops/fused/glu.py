"""SwiGLU gate silu(a) * b fused into one Triton pass forward and one backward, wrapped as torch.library custom
ops (GLU Variants Improve Transformer, arXiv 2002.05202).

a, b: one shape; y = silu(a) * b with silu(a) = a * sigmoid(a), computed in float32 and cast to a's dtype.
Backward: da = dy * b * sigmoid(a) * (1 + a * (1 - sigmoid(a))), db = dy * silu(a).
`swiglu_packed(ab)` takes a and b side by side in one tensor [..., 2H] (the output of one fused W1|W3 matmul):
the kernels read the two halves in place and write the gradient back as one [..., 2H] tensor, so neither the
split nor its backward (a concatenation) costs a copy. Shape letters: N rows, H channels of a and b.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.fused import HAS_TRITON, empty_like, use_triton
from effarch.ops.fused.reference import swiglu_reference
from effarch.ops.grid import cdiv, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd(A, B, Y, H, stride_a, stride_b, BLOCK: tl.constexpr):
        # Program (row, block of channels); a and b rows may be strided (halves of one [N, 2H] tensor), y is
        # contiguous [N, H].
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        tl.store(Y + row * H + cols, (a * sig * b).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(A, B, DY, DA, DB, H, stride_a, stride_b, stride_da, stride_db, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        da = dy * b * sig * (1.0 + a * (1.0 - sig))
        db = dy * a * sig
        tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + row * stride_db + cols, db.to(DB.dtype.element_ty), mask=mask)


MAX_BLOCK = 1024  # channels per program


def _grid(N: int, H: int) -> tuple[tuple[int, int], int]:
    block = min(MAX_BLOCK, next_power_of_2(max(H, 1)))
    return (N, cdiv(H, block)), block


def _launch_fwd(a: Tensor, b: Tensor) -> Tensor:
    """a, b [N, H] with unit channel stride -> y [N, H] contiguous."""
    N, H = a.shape
    y = empty_like(a, shape=(N, H))
    if N and H:
        grid, block = _grid(N, H)
        _swiglu_fwd[grid](a, b, y, H, a.stride(0), b.stride(0), BLOCK=block)
    return y


def _launch_bwd(a: Tensor, b: Tensor, dy: Tensor, da: Tensor, db: Tensor) -> None:
    N, H = a.shape
    if N and H:
        grid, block = _grid(N, H)
        _swiglu_bwd[grid](a, b, dy, da, db, H, a.stride(0), b.stride(0), da.stride(0), db.stride(0), BLOCK=block)


# Two tensors --------------------------------------------------------------------------------------------------


def _fwd(a: Tensor, b: Tensor) -> Tensor:
    """a, b [N, H] (rows may be strided, channels contiguous) -> silu(a) * b [N, H]."""
    return _launch_fwd(a, b)


_fwd_op_call = KernelCall("effarch::fused_swiglu_fwd", _fwd)
_fwd_op = _fwd_op_call.op


@_fwd_op.register_fake
def _(a, b):
    return a.new_empty(a.shape)


def _bwd(a: Tensor, b: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(da, db), each [N, H] contiguous in its input's dtype."""
    da, db = empty_like(a), empty_like(b)
    _launch_bwd(a, b, dy, da, db)
    return da, db


_bwd_op_call = KernelCall("effarch::fused_swiglu_bwd", _bwd)
_bwd_op = _bwd_op_call.op


@_bwd_op.register_fake
def _(a, b, dy):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    a, b = ctx.saved_tensors
    return _bwd_op_call(a, b, dy.contiguous())


_fwd_op_call.differentiable(_setup, _backward)


# One tensor holding both halves -----------------------------------------------------------------------------


def _packed_fwd(ab: Tensor) -> Tensor:
    """ab [N, 2H] contiguous -> silu(ab[:, :H]) * ab[:, H:] [N, H]."""
    a, b = ab.chunk(2, dim=-1)
    return _launch_fwd(a, b)


_packed_fwd_op_call = KernelCall("effarch::fused_swiglu_packed_fwd", _packed_fwd)
_packed_fwd_op = _packed_fwd_op_call.op


@_packed_fwd_op.register_fake
def _(ab):
    return ab.new_empty(ab.shape[0], ab.shape[1] // 2)


def _packed_bwd(ab: Tensor, dy: Tensor) -> Tensor:
    """d ab [N, 2H]: (da, db) written side by side."""
    dab = empty_like(ab)
    a, b = ab.chunk(2, dim=-1)
    da, db = dab.chunk(2, dim=-1)
    _launch_bwd(a, b, dy, da, db)
    return dab


_packed_bwd_op_call = KernelCall("effarch::fused_swiglu_packed_bwd", _packed_bwd)
_packed_bwd_op = _packed_bwd_op_call.op


@_packed_bwd_op.register_fake
def _(ab, dy):
    return torch.empty_like(ab)


def _packed_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _packed_backward(ctx, dy):
    (ab,) = ctx.saved_tensors
    return _packed_bwd_op_call(ab, dy.contiguous())


_packed_fwd_op_call.differentiable(_packed_setup, _packed_backward)


# Public entry points --------------------------------------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    """x as [N, H] with contiguous channels; a view where the layout allows (halves of a wider tensor do)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def swiglu(a: Tensor, b: Tensor, *, backend: str = "auto") -> Tensor:
    """silu(a) * b for a, b of one shape (any), output in a's dtype; see the module docstring."""
    if a.shape != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)}, but it must have a's shape {tuple(a.shape)}")
    if not use_triton(backend, a, b):
        return swiglu_reference(a, b)
    if a.dtype != b.dtype:
        raise ValueError(f"b has dtype {b.dtype}, but the Triton kernel needs a's dtype {a.dtype}")
    if a.numel() == 0:
        return swiglu_reference(a, b)
    return _fwd_op_call(_rows(a), _rows(b)).reshape(a.shape)


def swiglu_packed(ab: Tensor, *, backend: str = "auto") -> Tensor:
    """silu(a) * b for (a, b) = ab.chunk(2, dim=-1), ab [..., 2H] -> [..., H] in ab's dtype."""
    if ab.dim() == 0 or ab.shape[-1] % 2:
        raise ValueError(f"ab has shape {tuple(ab.shape)}, but its last dimension must be even (a and b side by side)")
    if not use_triton(backend, ab) or ab.numel() == 0:
        return swiglu_reference(*ab.chunk(2, dim=-1))
    shape = (*ab.shape[:-1], ab.shape[-1] // 2)
    return _packed_fwd_op_call(ab.reshape(-1, ab.shape[-1]).contiguous()).reshape(shape)
