"""Mamba-2's step size, log decay and scaled values in one Triton pass each way, as torch.library custom ops
("Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality",
arXiv 2405.21060):

    dt = softplus(dt_raw + dt_bias),   log_decay = -exp(A_log) * dt   (float32, [..., H])
    v = x * dt                         (x's dtype, [..., H, P]: each head's P channels scaled by its step)

dt_raw [..., H] are a token's per-head pre-activations (a slice of the layer's input projection: any row stride),
x [..., H, P] the convolved inputs, A_log and dt_bias [H]. In PyTorch the scaled values alone are a float32
product over every channel, its cast, and backward the float32 gradient, its product with dt, its cast and the
product with x summed over P: several passes over tokens x H x P elements, each moving 2-4 bytes per element more
than the one pass here (read x, write v forward; read x and dv, write dx backward). The per-head sums of the
parameters' gradients are summed over tokens afterwards (`sum_partials`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.fused import empty_like, use_triton
from effarch.ops.fused.delta_gates import _softplus, _sums_dtype
from effarch.ops.fused.reference import ssd_inputs_reference
from effarch.ops.grid import cdiv, next_power_of_2
from effarch.ops.partials import sum_partials

ELEMENTS = 2048  # elements (token-head pairs x padded channels) per program


@triton.jit
def _steps(DT, A_LOG, DT_BIAS, pairs, pm, H, sdt):
    """(raw + bias, dt, -exp(A_log)) of each token-head pair, float32."""
    n = pairs // H
    h = pairs % H
    x = tl.load(DT + n * sdt + h, mask=pm, other=0.0).to(tl.float32)
    x += tl.load(DT_BIAS + h, mask=pm, other=0.0).to(tl.float32)
    neg_a = -tl.exp(tl.load(A_LOG + h, mask=pm, other=0.0).to(tl.float32))
    return x, _softplus(x), neg_a


@triton.jit
def _ssd_fwd(DT, X, A_LOG, DT_BIAS, LOGD, V, NH, H, P, sdt, R: tl.constexpr, BP: tl.constexpr):
    pairs = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    pm = pairs < NH
    _, dt, neg_a = _steps(DT, A_LOG, DT_BIAS, pairs, pm, H, sdt)
    tl.store(LOGD + pairs, neg_a * dt, mask=pm)
    cols = tl.arange(0, BP)
    m = pm[:, None] & (cols < P)[None, :]
    off = pairs[:, None] * P + cols[None, :]
    xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    tl.store(V + off, (xv * dt[:, None]).to(V.dtype.element_ty), mask=m)


@triton.jit
def _ssd_bwd(DT, X, A_LOG, DT_BIAS, DLOGD, DV, DX, PART, NH, H, P, sdt, HAS_DLOGD: tl.constexpr,
             HAS_DV: tl.constexpr, R: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """PART [N, 2, H] float32: per pair, its share of dA_log (dlog_decay * log_decay) and d dt_raw (= its share
    of d dt_bias)."""
    pairs = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    pm = pairs < NH
    x, dt, neg_a = _steps(DT, A_LOG, DT_BIAS, pairs, pm, H, sdt)
    cols = tl.arange(0, BP)
    m = pm[:, None] & (cols < P)[None, :]
    off = pairs[:, None] * P + cols[None, :]
    d_dt = tl.zeros([R], dtype=tl.float32)
    d_alog = tl.zeros([R], dtype=tl.float32)
    if HAS_DLOGD:
        dl = tl.load(DLOGD + pairs, mask=pm, other=0.0).to(tl.float32)
        d_dt += dl * neg_a
        d_alog = dl * neg_a * dt  # d log_decay / d A_log = log_decay
    if HAS_DV:
        dv = tl.load(DV + off, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        d_dt += tl.sum(dv * xv, axis=1)
        tl.store(DX + off, (dv * dt[:, None]).to(DX.dtype.element_ty), mask=m)
    else:
        tl.store(DX + off, tl.zeros([R, BP], dtype=tl.float32).to(DX.dtype.element_ty), mask=m)
    n = pairs // H
    h = pairs % H
    tl.store(PART + n * 2 * H + h, d_alog, mask=pm)
    tl.store(PART + n * 2 * H + H + h, d_dt * tl.sigmoid(x), mask=pm)  # d softplus(x) / dx = sigmoid(x)


def _tile(P: int) -> tuple[int, int]:
    bp = next_power_of_2(P)
    return max(1, ELEMENTS // bp), bp


def _fwd(dt: Tensor, x: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """dt [N, H] (unit column stride), x [N, H, P] contiguous, A_log, dt_bias [H] -> (log_decay [N, H] float32,
    v [N, H, P] in x's dtype)."""
    N, H, P = x.shape
    log_decay = empty_like(x, dtype=torch.float32, shape=(N, H))
    v = empty_like(x)
    r, bp = _tile(P)
    if N * H:
        _ssd_fwd[(cdiv(N * H, r),)](dt, x, A_log, dt_bias, log_decay, v, N * H, H, P, dt.stride(0), R=r, BP=bp)
    return log_decay, v


_fwd_op_call = KernelCall("effarch::fused_ssd_inputs_fwd", _fwd)
_fwd_op = _fwd_op_call.op


@_fwd_op.register_fake
def _(dt, x, A_log, dt_bias):
    return x.new_empty(x.shape[:2], dtype=torch.float32), torch.empty_like(x)


def _bwd(
    dt: Tensor, x: Tensor, A_log: Tensor, dt_bias: Tensor, dlog_decay: Tensor | None, dv: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d dt_raw [N, H] in dt's dtype, dx [N, H, P] in x's dtype, [dA_log; ddt_bias] [2, H] in the parameters'
    dtype when they share one, else float32)."""
    N, H, P = x.shape
    dx = empty_like(x)
    part = torch.empty(N, 2, H, dtype=torch.float32, device=x.device)
    r, bp = _tile(P)
    if N * H:
        _ssd_bwd[(cdiv(N * H, r),)](dt, x, A_log, dt_bias, dlog_decay, dv, dx, part, N * H, H, P, dt.stride(0),
                                    HAS_DLOGD=dlog_decay is not None, HAS_DV=dv is not None, R=r, BP=bp)  # fmt: skip
    ddt = torch.empty(N, H, dtype=dt.dtype, device=x.device).copy_(part[:, 1])
    return ddt, dx, sum_partials(part, _sums_dtype(A_log, dt_bias))


_bwd_op_call = KernelCall("effarch::fused_ssd_inputs_bwd", _bwd)
_bwd_op = _bwd_op_call.op


@_bwd_op.register_fake
def _(dt, x, A_log, dt_bias, dlog_decay, dv):
    return (
        dt.new_empty(x.shape[:2]),
        torch.empty_like(x),
        x.new_empty(2, x.shape[1], dtype=_sums_dtype(A_log, dt_bias)),
    )


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)  # an output without a gradient is skipped in the kernel, not zero-filled


def _backward(ctx, dlog_decay, dv):
    dt, x, A_log, dt_bias = ctx.saved_tensors
    dlog_decay = dlog_decay.contiguous() if dlog_decay is not None else None
    dv = dv.contiguous() if dv is not None else None
    ddt, dx, sums = _bwd_op_call(dt, x, A_log, dt_bias, dlog_decay, dv)
    return ddt, dx, sums[0].to(A_log.dtype), sums[1].to(dt_bias.dtype)


_fwd_op_call.differentiable(_setup, _backward)


def ssd_inputs(
    dt: Tensor, x: Tensor, A_log: Tensor, dt_bias: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """(log_decay [..., H] float32, v [..., H, P] in x's dtype) of Mamba-2 from the step pre-activations dt
    [..., H], the inputs x [..., H, P] and A_log, dt_bias [H]; see the module."""
    H = A_log.shape[0] if A_log.dim() == 1 else -1
    if A_log.dim() != 1 or dt_bias.shape != A_log.shape or x.dim() < 2 or dt.shape != x.shape[:-1] or dt.shape[-1] != H:
        raise ValueError(
            f"ssd_inputs: A_log and dt_bias must be [H], dt [..., H] and x [..., H, P]; got dt {tuple(dt.shape)}, "
            f"x {tuple(x.shape)}, A_log {tuple(A_log.shape)}, dt_bias {tuple(dt_bias.shape)}"
        )
    if not use_triton(backend, dt, x, A_log, dt_bias) or x.numel() == 0:
        return ssd_inputs_reference(dt, x, A_log, dt_bias)
    P = x.shape[-1]
    dt2 = dt.reshape(-1, H)
    if dt2.stride(-1) != 1 or (dt2.shape[0] > 1 and dt2.stride(0) < H):
        dt2 = dt2.contiguous()
    log_decay, v = _fwd_op_call(dt2, x.reshape(-1, H, P).contiguous(), A_log, dt_bias)
    return log_decay.reshape(dt.shape), v.reshape(x.shape)
