"""Per-head RMSNorm fused with the output gate of the linear-recurrence layers (GLA, DeltaNet, Gated DeltaNet,
...), forward and backward as Triton kernels wrapped as torch.library custom ops.

o, gate: [..., D] (one head's D = value dim per row, D <= 8192); weight: [D]. In float32, cast to o's dtype:
    y = o * rstd * weight * act(gate),   rstd = 1 / sqrt(mean(o^2) + eps),   act = silu or sigmoid.
Backward, with o_hat = o * rstd, a = act(gate) and g = dy * a * weight:
    do = rstd * (g - o_hat * mean(g * o_hat)),   d gate = dy * o_hat * weight * act'(gate),
    d weight = sum over rows of dy * a * o_hat.
Gate first (Mamba-2's gated norm): with u = o * a, y = u * rstd * weight, rstd = 1 / sqrt(mean(u^2) + eps);
backward, with u_hat = u * rstd and g = dy * weight: du = rstd * (g - u_hat * mean(g * u_hat)), do = du * a,
d gate = du * o * act'(gate), d weight = sum over rows of dy * u_hat.
In PyTorch (the reference, `HeadNorm` + the gate) every step is a float32 pass over the [B, T, H, D] output with
casts between: a large Gated DeltaNet training step on an H200 spent 122 ms of 668 in copies, most of them there.
Shape letters: N rows (all leading dimensions), D channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.fused import HAS_TRITON, RMS_NORM_MAX_D, empty_like, use_triton
from effarch.ops.fused.reference import gated_rms_norm_reference
from effarch.ops.grid import cdiv, next_power_of_2
from effarch.ops.partials import sum_partials

MAX_D = RMS_NORM_MAX_D
BWD_PROGRAMS = 1024  # backward programs at most: enough to fill a GPU, few d weight partials to sum
ACTIVATIONS = ("silu", "sigmoid")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gated_fwd(O, G, W, Y, RSTD, N, D, eps, SILU: tl.constexpr, GATE_FIRST: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
        # ROWS rows per program, each whole in registers.
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mr = rows < N
        mask = mr[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        a = g * sg if SILU else sg
        if GATE_FIRST:
            u = o * a
            rstd = tl.rsqrt(tl.sum(u * u, axis=1) / D + eps)
            y = u * rstd[:, None] * w[None, :]
        else:
            rstd = tl.rsqrt(tl.sum(o * o, axis=1) / D + eps)
            y = o * rstd[:, None] * w[None, :] * a
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=mr)

    @triton.jit
    def _gated_bwd(O, G, W, RSTD, DY, DO, DG, DW_PART, N, D, ROWS_PER_PROG, SILU: tl.constexpr,
                   GATE_FIRST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # Each program walks a contiguous run of rows, ROWS at a time, keeping its share of d weight in registers
        # (written once as a partial sum, summed on the host: deterministic, no atomics).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mc = cols < D
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)
        dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        start = pid * ROWS_PER_PROG
        for i in range(0, ROWS_PER_PROG, ROWS):
            rows = (start + i + tl.arange(0, ROWS)).to(tl.int64)
            mr = (rows < N) & (i + tl.arange(0, ROWS) < ROWS_PER_PROG)
            mask = mr[:, None] & mc[None, :]
            off = rows[:, None] * D + cols[None, :]
            o = tl.load(O + off, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(G + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=mr, other=0.0)
            sg = tl.sigmoid(g)
            if SILU:
                a = g * sg
                da = sg * (1.0 + g * (1.0 - sg))
            else:
                a = sg
                da = sg * (1.0 - sg)
            if GATE_FIRST:
                u_hat = o * a * rstd[:, None]
                gn = dy * w[None, :]
                du = rstd[:, None] * (gn - u_hat * (tl.sum(gn * u_hat, axis=1) / D)[:, None])
                dw += dy * u_hat
                tl.store(DG + off, (du * o * da).to(DG.dtype.element_ty), mask=mask)
                tl.store(DO + off, (du * a).to(DO.dtype.element_ty), mask=mask)
            else:
                o_hat = o * rstd[:, None]
                tl.store(DG + off, (dy * o_hat * w[None, :] * da).to(DG.dtype.element_ty), mask=mask)
                dw += dy * a * o_hat
                gn = dy * a * w[None, :]
                do = rstd[:, None] * (gn - o_hat * (tl.sum(gn * o_hat, axis=1) / D)[:, None])
                tl.store(DO + off, do.to(DO.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=mc)


def _rows(block: int) -> int:
    return max(1, min(16, 2048 // block))


def _num_warps(block: int, rows: int) -> int:
    return min(8, max(1, block * rows // 512))


def _fwd(o: Tensor, gate: Tensor, weight: Tensor, eps: float, silu: bool, gate_first: bool) -> tuple[Tensor, Tensor]:
    """o, gate [N, D] contiguous, weight [D] -> (y [N, D] in o's dtype, rstd [N] float32)."""
    N, D = o.shape
    y = empty_like(o)
    rstd = empty_like(o[:, 0], dtype=torch.float32)
    block = next_power_of_2(D)
    rows = _rows(block)
    if N:
        _gated_fwd[(cdiv(N, rows),)](o, gate, weight, y, rstd, N, D, eps, SILU=silu, GATE_FIRST=gate_first,
                                     ROWS=rows, BLOCK=block, num_warps=_num_warps(block, rows))  # fmt: skip
    return y, rstd


_fwd_op_call = KernelCall("effarch::fused_gated_rms_norm_fwd", _fwd)
_fwd_op = _fwd_op_call.op


@_fwd_op.register_fake
def _(o, gate, weight, eps, silu, gate_first):
    return torch.empty_like(o), o.new_empty(o.shape[0], dtype=torch.float32)


def _bwd(
    o: Tensor, gate: Tensor, weight: Tensor, rstd: Tensor, dy: Tensor, silu: bool, gate_first: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (do [N, D] in o's dtype, d gate [N, D] in gate's dtype, d weight [D] in weight's dtype)."""
    N, D = o.shape
    do = empty_like(o)
    dg = empty_like(gate)
    block = next_power_of_2(D)
    rows = _rows(block)
    n_prog = max(1, min(cdiv(N, rows), BWD_PROGRAMS))
    per = cdiv(cdiv(N, n_prog), rows) * rows if N else rows  # rows per program, a multiple of ROWS
    n_prog = cdiv(N, per) if N else 0
    dw_part = torch.empty(max(n_prog, 1), D, dtype=torch.float32, device=o.device)
    if N:
        _gated_bwd[(n_prog,)](o, gate, weight, rstd, dy, do, dg, dw_part, N, D, per, SILU=silu, GATE_FIRST=gate_first,
                              ROWS=rows, BLOCK=block, num_warps=_num_warps(block, rows))  # fmt: skip
    dw = sum_partials(dw_part[:n_prog], weight.dtype)
    return do, dg, dw


_bwd_op_call = KernelCall("effarch::fused_gated_rms_norm_bwd", _bwd)
_bwd_op = _bwd_op_call.op


@_bwd_op.register_fake
def _(o, gate, weight, rstd, dy, silu, gate_first):
    return torch.empty_like(o), torch.empty_like(gate), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    o, gate, weight, _, silu, gate_first = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zero tensor (one launch) for rstd's gradient; y always has one
    ctx.silu, ctx.gate_first = silu, gate_first
    ctx.save_for_backward(o, gate, weight, rstd)


def _backward(ctx, dy, _drstd):
    o, gate, weight, rstd = ctx.saved_tensors
    do, dg, dw = _bwd_op_call(o, gate, weight, rstd, dy.contiguous(), ctx.silu, ctx.gate_first)
    return do, dg, dw, None, None, None


_fwd_op_call.differentiable(_setup_context, _backward)


def gated_rms_norm(
    o: Tensor,
    weight: Tensor,
    gate: Tensor,
    eps: float,
    activation: str = "silu",
    *,
    gate_first: bool = False,
    backend: str = "auto",
) -> Tensor:
    """RMSNorm of o [..., D] over its last dimension times weight [D] times act(gate) (gate of o's shape), in
    float32, cast to o's dtype; with `gate_first`, RMSNorm of o * act(gate) times weight. See the module."""
    D = o.shape[-1]
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if weight.shape != (D,):
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, but it must be ({D},) for o of shape {tuple(o.shape)}"
        )
    if gate.shape != o.shape:
        raise ValueError(f"gate has shape {tuple(gate.shape)}, but it must have o's shape {tuple(o.shape)}")
    if not use_triton(backend, o, weight, gate) or D > MAX_D:
        if backend == "triton" and D > MAX_D:
            raise ValueError(f"o has last dimension {D}, but the Triton kernel supports at most {MAX_D}")
        return gated_rms_norm_reference(o, weight, gate, eps, activation, gate_first)
    y, _ = _fwd_op_call(o.reshape(-1, D).contiguous(), gate.reshape(-1, D).contiguous(), weight.contiguous(), float(eps),
                   activation == "silu", bool(gate_first))  # fmt: skip
    return y.reshape(o.shape)
