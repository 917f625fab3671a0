"""Gated DeltaNet's two gates from their projections in one Triton pass each way, as torch.library custom ops
("Gated Delta Networks: Improving Mamba2 with Delta Rule", arXiv 2412.06464):

    g = -exp(A_log) * softplus(a + dt_bias)     (the log decay, float32)
    beta = beta_scale * sigmoid(b)               (the update strength, float32; beta_scale 2 allows negative
                                                  eigenvalues)

a and b are a token's per-head pre-activations, given side by side as ab [..., 2H] (a's H columns, then b's: the
layer takes both from one 2H-wide matrix product instead of two H-wide ones, each of which reread the whole input
forward and backward), A_log and dt_bias [H] parameters. In PyTorch these are about nine launches forward and a dozen backward on tensors of only tokens x heads elements (196K at 32K tokens
and 6 heads), so their cost is the launches themselves: some 500 of a 24-layer model's training step. Here the
forward is one launch; the backward one, plus the sum of the per-program partial gradients of A_log and dt_bias
and their cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.fused import empty_like, use_triton
from effarch.ops.fused.reference import delta_gates_reference
from effarch.ops.grid import cdiv, next_power_of_2
from effarch.ops.partials import sum_partials

ELEMENTS = 1024  # elements (rows x padded heads) per program: at 4096 the sm_90 backward spilled (4 warps)


@triton.jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(z) as z - z^2 / 2 where 1 + z would round to 1
    z = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))


@triton.jit
def _gates_fwd(AB, A_LOG, DT_BIAS, G, BETA, N, H, beta_scale, ROWS: tl.constexpr, BH: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BH)
    cm = cols < H
    m = (rows < N)[:, None] & cm[None, :]
    off = rows[:, None] * H + cols[None, :]
    off_a = rows[:, None] * (2 * H) + cols[None, :]  # a's columns of ab; b's follow H later
    neg_a = -tl.exp(tl.load(A_LOG + cols, mask=cm, other=0.0).to(tl.float32))
    bias = tl.load(DT_BIAS + cols, mask=cm, other=0.0).to(tl.float32)
    a = tl.load(AB + off_a, mask=m, other=0.0).to(tl.float32)
    b = tl.load(AB + H + off_a, mask=m, other=0.0).to(tl.float32)
    tl.store(G + off, neg_a[None, :] * _softplus(a + bias[None, :]), mask=m)
    tl.store(BETA + off, beta_scale * tl.sigmoid(b), mask=m)


@triton.jit
def _gates_bwd(AB, A_LOG, DT_BIAS, DG, DBETA, DAB, PART, N, H, beta_scale, HAS_DG: tl.constexpr,
               HAS_DBETA: tl.constexpr, ROWS: tl.constexpr, BH: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BH)
    cm = cols < H
    m = (rows < N)[:, None] & cm[None, :]
    off = rows[:, None] * H + cols[None, :]
    off_a = rows[:, None] * (2 * H) + cols[None, :]
    d_neg_a = tl.zeros([BH], dtype=tl.float32)
    d_bias = tl.zeros([BH], dtype=tl.float32)
    if HAS_DG:
        neg_a = -tl.exp(tl.load(A_LOG + cols, mask=cm, other=0.0).to(tl.float32))
        bias = tl.load(DT_BIAS + cols, mask=cm, other=0.0).to(tl.float32)
        x = tl.load(AB + off_a, mask=m, other=0.0).to(tl.float32) + bias[None, :]
        dg = tl.load(DG + off, mask=m, other=0.0).to(tl.float32)
        dx = dg * neg_a[None, :] * tl.sigmoid(x)  # d softplus(x) / dx = sigmoid(x)
        tl.store(DAB + off_a, dx.to(DAB.dtype.element_ty), mask=m)
        d_bias = tl.sum(dx, axis=0)
        d_neg_a = tl.sum(dg * neg_a[None, :] * _softplus(x), axis=0)  # d g / d A_log = g
    else:
        tl.store(DAB + off_a, tl.zeros([ROWS, BH], dtype=tl.float32).to(DAB.dtype.element_ty), mask=m)
    if HAS_DBETA:
        s = tl.sigmoid(tl.load(AB + H + off_a, mask=m, other=0.0).to(tl.float32))
        dbeta = tl.load(DBETA + off, mask=m, other=0.0).to(tl.float32)
        tl.store(DAB + H + off_a, (dbeta * beta_scale * s * (1.0 - s)).to(DAB.dtype.element_ty), mask=m)
    else:
        tl.store(DAB + H + off_a, tl.zeros([ROWS, BH], dtype=tl.float32).to(DAB.dtype.element_ty), mask=m)
    tl.store(PART + pid * 2 * H + cols, d_neg_a, mask=cm)
    tl.store(PART + pid * 2 * H + H + cols, d_bias, mask=cm)


def _sums_dtype(A_log: Tensor, dt_bias: Tensor) -> torch.dtype:
    return A_log.dtype if A_log.dtype == dt_bias.dtype else torch.float32


def _tile(H: int) -> tuple[int, int]:
    bh = next_power_of_2(H)
    return max(1, ELEMENTS // bh), bh


def _fwd(ab: Tensor, A_log: Tensor, dt_bias: Tensor, beta_scale: float) -> tuple[Tensor, Tensor]:
    """ab [N, 2H] contiguous, A_log, dt_bias [H] -> (g, beta) [N, H] float32."""
    N, H = ab.shape[0], ab.shape[1] // 2
    g = empty_like(ab, dtype=torch.float32, shape=(N, H))
    beta = empty_like(ab, dtype=torch.float32, shape=(N, H))
    rows, bh = _tile(H)
    if N:
        _gates_fwd[(cdiv(N, rows),)](ab, A_log, dt_bias, g, beta, N, H, beta_scale, ROWS=rows, BH=bh)
    return g, beta


_fwd_op_call = KernelCall("effarch::fused_delta_gates_fwd", _fwd)
_fwd_op = _fwd_op_call.op


@_fwd_op.register_fake
def _(ab, A_log, dt_bias, beta_scale):
    shape = (ab.shape[0], ab.shape[1] // 2)
    return ab.new_empty(shape, dtype=torch.float32), ab.new_empty(shape, dtype=torch.float32)


def _bwd(
    ab: Tensor, A_log: Tensor, dt_bias: Tensor, dg: Tensor | None, dbeta: Tensor | None, beta_scale: float
) -> tuple[Tensor, Tensor]:
    """-> (dab [N, 2H] in ab's dtype, [dA_log; ddt_bias] [2, H] in the parameters' dtype when they share one,
    else float32)."""
    N, H = ab.shape[0], ab.shape[1] // 2
    dab = empty_like(ab)
    rows, bh = _tile(H)
    n_prog = cdiv(N, rows)
    part = torch.empty(n_prog, 2, H, dtype=torch.float32, device=ab.device)
    if N:
        _gates_bwd[(n_prog,)](ab, A_log, dt_bias, dg, dbeta, dab, part, N, H, beta_scale, HAS_DG=dg is not None,
                              HAS_DBETA=dbeta is not None, ROWS=rows, BH=bh)  # fmt: skip
    # (dA_log, ddt_bias) as rows of one [2, H] tensor: d g / d A_log = g, so dA_log sums dg * g
    return dab, sum_partials(part, _sums_dtype(A_log, dt_bias))


_bwd_op_call = KernelCall("effarch::fused_delta_gates_bwd", _bwd)
_bwd_op = _bwd_op_call.op


@_bwd_op.register_fake
def _(ab, A_log, dt_bias, dg, dbeta, beta_scale):
    return torch.empty_like(ab), ab.new_empty(2, ab.shape[1] // 2, dtype=_sums_dtype(A_log, dt_bias))


def _setup(ctx, inputs, output):
    ab, A_log, dt_bias, beta_scale = inputs
    ctx.save_for_backward(ab, A_log, dt_bias)
    ctx.beta_scale = beta_scale
    ctx.set_materialize_grads(False)  # a gate without a gradient is skipped in the kernel, not zero-filled


def _backward(ctx, dg, dbeta):
    ab, A_log, dt_bias = ctx.saved_tensors
    dg = dg.contiguous() if dg is not None else None
    dbeta = dbeta.contiguous() if dbeta is not None else None
    dab, sums = _bwd_op_call(ab, A_log, dt_bias, dg, dbeta, ctx.beta_scale)
    return dab, sums[0].to(A_log.dtype), sums[1].to(dt_bias.dtype), None


_fwd_op_call.differentiable(_setup, _backward)


def delta_gates(
    ab: Tensor, A_log: Tensor, dt_bias: Tensor, beta_scale: float = 1.0, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """(g, beta) [..., H] of Gated DeltaNet from the pre-activations a, b side by side in ab [..., 2H] and A_log,
    dt_bias [H]; see the module."""
    H = A_log.shape[0] if A_log.dim() == 1 else -1
    if A_log.dim() != 1 or dt_bias.shape != A_log.shape or ab.dim() == 0 or ab.shape[-1] != 2 * H:
        raise ValueError(
            f"delta_gates: A_log and dt_bias must be [H] and ab [..., 2H] (a's H columns, then b's); got ab "
            f"{tuple(ab.shape)}, A_log {tuple(A_log.shape)}, dt_bias {tuple(dt_bias.shape)}"
        )
    if not use_triton(backend, ab, A_log, dt_bias) or ab.numel() == 0:
        return delta_gates_reference(ab, A_log, dt_bias, beta_scale)
    shape = ab.shape[:-1] + (H,)
    g, beta = _fwd_op_call(ab.reshape(-1, 2 * H).contiguous(), A_log, dt_bias, float(beta_scale))
    return g.reshape(shape), beta.reshape(shape)
