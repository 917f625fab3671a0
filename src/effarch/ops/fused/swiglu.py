"""SwiGLU gate silu(a) * b fused into one Triton pass forward and one backward (GLU Variants Improve
Transformer, arXiv 2002.05202).

a, b: any shape, the same for both. y = silu(a) * b with silu(a) = a * sigmoid(a), computed in float32 and
cast to a's dtype. Backward: da = dy * b * sigmoid(a) * (1 + a * (1 - sigmoid(a))), db = dy * silu(a).
"""

from __future__ import annotations

import torch

from effarch.ops.fused import HAS_TRITON, empty_like, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        tl.store(Y + offs, (a * sig * b).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(A, B, DY, DA, DB, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        da = dy * b * sig * (1.0 + a * (1.0 - sig))
        db = dy * a * sig
        tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + offs, db.to(DB.dtype.element_ty), mask=mask)


BLOCK = 1024  # elements per program


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The spec: silu(a) * b in (at least) float32, cast to a's dtype."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return (torch.nn.functional.silu(a.to(acc)) * b.to(acc)).to(a.dtype)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        y = empty_like(a)
        n = a.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = empty_like(a), empty_like(b)
        n = a.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](a, b, dy, da, db, n, BLOCK=BLOCK)
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(a) * b for a, b of one shape (any), output in a's dtype; see the module docstring."""
    if a.shape != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)}, but it must have a's shape {tuple(a.shape)}")
    if use_triton(backend, a, b):
        if a.dtype != b.dtype:
            raise ValueError(f"b has dtype {b.dtype}, but the Triton kernel needs a's dtype {a.dtype}")
        return _SwiGLU.apply(a, b)
    return swiglu_reference(a, b)
