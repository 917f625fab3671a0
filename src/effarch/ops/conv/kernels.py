"""Triton kernels of the causal depthwise short convolution (+ SiLU) on [B, T, C], forward and backward.

    pre_t = sum_j w_j x_{t-(W-1-j)} + b,   y_t = act(pre_t),   x_s = 0 before the start of t's sequence,

w [C, W] (w[:, W-1] multiplies the current token). The backward recomputes pre from x (nothing but x is saved) in
two passes: the first writes dz = dy act'(pre) and each token block's share of
    dw_j = sum_t dz_t x_{t-(W-1-j)},   db = sum_t dz_t   (summed over the blocks afterwards);
the second reads dz back: dx_t = sum_d w_{W-1-d} dz_{t+d} over t+d in t's sequence. (One kernel recomputing the W
shifted pre-activations of every output it reads took 1.7-2.6x as long on an H200: benchmarks/conv_ops.py.)
Packed sequences (B = 1 with cu_seqlens) pass each token's sequence start [T] int32.

Convolutions joined over their inputs side by side (DeltaNet's q, k and v) can take their outputs as three
tensors of their own (`causal_conv1d_triton(..., splits=(w0, w1, w2))`): the forward writes each channel block into
its segment's contiguous output and the backward reads the three gradients where they are, so the slices a layer
takes of one joined output need no copies forward (q, k and v contiguous for the recurrence) and their gradients no
concatenation backward. A channel block lies in one segment when the widths are multiples of the blocks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.grid import cdiv
from effarch.ops.partials import sum_partials

POISON = False  # tests set this: outputs start as NaN, so a value no kernel wrote cannot pass
BT, BC = 64, 64  # tokens and channels per program
MAX_WIDTH = 8
# The backward's dz pass at a tile of its own (tokens, channels; None for BT x BC) and its warps. At BT x BC = 64 x 64
# its sm_90 build needs 8 warps of 152 registers per thread (4 spill), so one program fills an SM and on an H200 it ran
# at about a quarter of the forward's bandwidth. At 16 x 64 and one warp many programs share each SM: fwd + bwd on an
# H200 (bf16, width 4) 1.19 -> 0.70 ms at 4 x 8K x 2048 channels and 1.87 -> 1.33 at 32K x 4096, even (0.80 / 0.84)
# at 4 x 8K x 1024 (benchmarks/conv_ops.py --dz; 32 x 64 x 4 warps, 16 x 64 x 2, 32 x 32 x 2, 16 x 128 x 4 also ran).
DZ_TILE: tuple[int, int] | None = (16, 64)
DZ_WARPS = 1
# Outputs of joined convolutions written apart (see the module docstring); EFFARCH_CONV_SPLIT=0 writes one joined
# output that the layer slices and copies. On an H200 (large Gated DeltaNet, eager bf16 training, alternated in one
# run) split took 181.2 / 172.3 and 174.0 / 174.8 thousand tokens/s at 2K x 16 / 8K x 4 against 160.0 / 160.0 and
# 175.3 / 171.2 joined (+6% / +5% on the means).
SPLIT_OUTPUTS = os.environ.get("EFFARCH_CONV_SPLIT", "1") != "0"


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.empty(*shape, dtype=dtype, device=device)
    return x.fill_(float("nan")) if POISON else x


@triton.jit
def _pre(x, w, b, start, base, u, su, rc, mu, mc, T, C: tl.constexpr, W: tl.constexpr, BTk: tl.constexpr,
         BCk: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """pre-activation at positions u [BT] (sequence starts su) for channels rc: float32 [BT, BC]."""
    acc = tl.zeros([BTk, BCk], dtype=tl.float32)
    for j in tl.static_range(W):
        s = u - (W - 1 - j)
        ok = mu & (s >= su)
        xv = tl.load(x + base + s.to(tl.int64)[:, None] * C + rc[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
        wj = tl.load(w + rc * W + j, mask=mc, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wj[None, :]
    if HAS_BIAS:
        acc += tl.load(b + rc, mask=mc, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile(i_t, i_c, i_b, T, C: tl.constexpr, BTk: tl.constexpr, BCk: tl.constexpr):
    """Token and channel indices of a program's tile, their masks, and the offset of its sequence row."""
    rt = i_t * BTk + tl.arange(0, BTk)
    rc = i_c * BCk + tl.arange(0, BCk)
    return rt, rc, rt < T, rc < C, i_b.to(tl.int64) * T * C


@triton.jit
def _seg_off(i_b, rt, rc, T, c0, width):
    """Offsets of tokens rt x channels rc of sequence row i_b in a segment [B, T, width] starting at channel c0."""
    return (i_b.to(tl.int64) * T + rt.to(tl.int64))[:, None] * width + (rc - c0)[None, :]


@triton.jit
def conv_fwd_kernel(x, w, b, start, y, y1, y2, S1, S2, T, C: tl.constexpr, W: tl.constexpr, BTk: tl.constexpr,
                    BCk: tl.constexpr, HAS_BIAS: tl.constexpr, PACKED: tl.constexpr, ACT: tl.constexpr,
                    SPLIT: tl.constexpr):  # fmt: skip
    """y = act(pre) for BT tokens x BC channels of one sequence row. Grid (cdiv(T, BT), cdiv(C, BC), B). SPLIT:
    channels [0, S1) go to y [B, T, S1], [S1, S2) to y1 and [S2, C) to y2 (each block in one segment)."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rt, rc, mt, mc, base = _tile(i_t, i_c, i_b, T, C, BTk, BCk)
    if PACKED:
        st = tl.load(start + rt, mask=mt, other=0)
    else:
        st = rt * 0
    pre = _pre(x, w, b, start, base, rt, st, rc, mt, mc, T, C, W, BTk, BCk, HAS_BIAS)
    if ACT:
        pre = pre * tl.sigmoid(pre)
    m = mt[:, None] & mc[None, :]
    if SPLIT:
        c0 = i_c * BCk
        if c0 < S1:
            tl.store(y + _seg_off(i_b, rt, rc, T, 0, S1), pre.to(y.dtype.element_ty), mask=m)
        elif c0 < S2:
            tl.store(y1 + _seg_off(i_b, rt, rc, T, S1, S2 - S1), pre.to(y.dtype.element_ty), mask=m)
        else:
            tl.store(y2 + _seg_off(i_b, rt, rc, T, S2, C - S2), pre.to(y.dtype.element_ty), mask=m)
    else:
        tl.store(y + base + rt.to(tl.int64)[:, None] * C + rc[None, :], pre.to(y.dtype.element_ty), mask=m)


@triton.jit
def conv_dz_kernel(x, w, b, start, dy, dy1, dy2, S1, S2, dz, dwp, dbp, T, C: tl.constexpr, W: tl.constexpr,
                   BTk: tl.constexpr, BCk: tl.constexpr, HAS_BIAS: tl.constexpr, PACKED: tl.constexpr,
                   ACT: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """Backward, first pass: dz = dy act'(pre) for BT tokens x BC channels (written when ACT or SPLIT; otherwise dz
    is dy) and this block's share of dw [C, W] and db [C]. Grid (cdiv(T, BT), cdiv(C, BC), B). SPLIT: dy in three
    segments as the forward's outputs."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rt, rc, mt, mc, base = _tile(i_t, i_c, i_b, T, C, BTk, BCk)
    blk = (i_b * tl.num_programs(0) + i_t).to(tl.int64)
    if PACKED:
        st = tl.load(start + rt, mask=mt, other=0)
    else:
        st = rt * 0
    off = base + rt.to(tl.int64)[:, None] * C + rc[None, :]
    m = mt[:, None] & mc[None, :]
    if SPLIT:
        c0 = i_c * BCk
        if c0 < S1:
            g = tl.load(dy + _seg_off(i_b, rt, rc, T, 0, S1), mask=m, other=0.0).to(tl.float32)
        elif c0 < S2:
            g = tl.load(dy1 + _seg_off(i_b, rt, rc, T, S1, S2 - S1), mask=m, other=0.0).to(tl.float32)
        else:
            g = tl.load(dy2 + _seg_off(i_b, rt, rc, T, S2, C - S2), mask=m, other=0.0).to(tl.float32)
    else:
        g = tl.load(dy + off, mask=m, other=0.0).to(tl.float32)
    if ACT:
        pre = _pre(x, w, b, start, base, rt, st, rc, mt, mc, T, C, W, BTk, BCk, HAS_BIAS)
        sg = tl.sigmoid(pre)
        g = g * sg * (1.0 + pre * (1.0 - sg))
    if ACT or SPLIT:
        tl.store(dz + off, g.to(dz.dtype.element_ty), mask=m)
    for j in tl.static_range(W):
        s = rt - (W - 1 - j)
        ok = mt & (s >= st)
        xs = tl.load(x + base + s.to(tl.int64)[:, None] * C + rc[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
        tl.store(dwp + (blk * C + rc) * W + j, tl.sum(g * xs.to(tl.float32), axis=0), mask=mc)
    if HAS_BIAS:
        tl.store(dbp + blk * C + rc, tl.sum(g, axis=0), mask=mc)


@triton.jit
def conv_dx_kernel(dz, w, start, dx, T, C: tl.constexpr, W: tl.constexpr, BTk: tl.constexpr, BCk: tl.constexpr,
                   PACKED: tl.constexpr):  # fmt: skip
    """Backward, second pass: dx_t = sum_d w_{W-1-d} dz_{t+d} over t+d in t's sequence. Grid as the first."""
    i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rt, rc, mt, mc, base = _tile(i_t, i_c, i_b, T, C, BTk, BCk)
    dxa = tl.zeros([BTk, BCk], dtype=tl.float32)
    for d in tl.static_range(W):
        u = rt + d
        mu = u < T
        if PACKED:
            mu = mu & (tl.load(start + u, mask=mu, other=0) <= rt)  # u in t's sequence
        g = tl.load(dz + base + u.to(tl.int64)[:, None] * C + rc[None, :], mask=mu[:, None] & mc[None, :], other=0.0)
        wd = tl.load(w + rc * W + (W - 1 - d), mask=mc, other=0.0).to(tl.float32)
        dxa += g.to(tl.float32) * wd[None, :]
    off = base + rt.to(tl.int64)[:, None] * C + rc[None, :]
    tl.store(dx + off, dxa.to(dx.dtype.element_ty), mask=mt[:, None] & mc[None, :])


def _launch_args(x: Tensor, bias: Tensor | None, start: Tensor | None):
    B, T, C = x.shape
    grid = (cdiv(T, BT), cdiv(C, BC), B)
    return grid, (x if bias is None else bias), (x if start is None else start)


def conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, start: Tensor | None, act: bool) -> Tensor:
    """x [B, T, C] contiguous, weight [C, W] contiguous, bias [C] or None, start [T] int32 or None -> y [B, T, C]."""
    B, T, C = x.shape
    y = _empty(B, T, C, dtype=x.dtype, device=x.device)
    _launch_fwd(x, weight, bias, start, act, (y, y, y), C, C, False)
    return y


def conv_fwd_split(
    x: Tensor, weight: Tensor, bias: Tensor | None, start: Tensor | None, act: bool, w0: int, w1: int
) -> tuple[Tensor, Tensor, Tensor]:
    """As `conv_fwd`, y's channels in three contiguous outputs [B, T, w0], [B, T, w1], [B, T, C - w0 - w1] (widths
    multiples of BC)."""
    B, T, C = x.shape
    ys = tuple(_empty(B, T, w, dtype=x.dtype, device=x.device) for w in (w0, w1, C - w0 - w1))
    _launch_fwd(x, weight, bias, start, act, ys, w0, w0 + w1, True)
    return ys


def _launch_fwd(x, weight, bias, start, act, ys, S1, S2, split) -> None:
    B, T, C = x.shape
    grid, b, st = _launch_args(x, bias, start)
    conv_fwd_kernel[grid](x, weight, b, st, *ys, S1, S2, T, C, weight.shape[1], BT, BC, bias is not None,
                          start is not None, act, split)  # fmt: skip


conv_fwd_op_call = KernelCall("effarch::causal_conv1d_fwd", conv_fwd)
conv_fwd_op = conv_fwd_op_call.op
conv_fwd_split_op_call = KernelCall("effarch::causal_conv1d_split_fwd", conv_fwd_split)


@conv_fwd_op.register_fake
def _(x, weight, bias, start, act):
    return torch.empty_like(x)


@conv_fwd_split_op_call.op.register_fake
def _(x, weight, bias, start, act, w0, w1):
    B, T, C = x.shape
    return tuple(x.new_empty(B, T, w) for w in (w0, w1, C - w0 - w1))


def conv_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, start: Tensor | None, act: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx [B, T, C], dw [C, W] in weight's dtype, db [C] in bias's dtype or an empty tensor)."""
    C = x.shape[2]
    return _launch_bwd((dy, dy, dy), x, weight, bias, start, act, C, C, False)


def conv_bwd_split(
    dy0: Tensor, dy1: Tensor, dy2: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, start: Tensor | None,
    act: bool, w0: int, w1: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`conv_bwd` of `conv_fwd_split`: the gradients of its three outputs, each contiguous."""
    return _launch_bwd((dy0, dy1, dy2), x, weight, bias, start, act, w0, w0 + w1, True)


def _launch_bwd(dys, x, weight, bias, start, act, S1, S2, split) -> tuple[Tensor, Tensor, Tensor]:
    B, T, C = x.shape
    W = weight.shape[1]
    grid, b, st = _launch_args(x, bias, start)
    dz_bt, dz_bc = dz_tile()
    dz_grid = (cdiv(T, dz_bt), cdiv(C, dz_bc), B)
    nblk = dz_grid[0] * B  # token blocks of the dz pass, each writing its share of dw and db
    dx = _empty(B, T, C, dtype=x.dtype, device=x.device)
    dwp = _empty(nblk, C, W, dtype=torch.float32, device=x.device)
    dbp = _empty(nblk, C, dtype=torch.float32, device=x.device) if bias is not None else dwp
    # dz in dy's dtype, as PyTorch's SiLU backward hands it to the convolution's; split gradients are joined there
    dz = _empty(B, T, C, dtype=dys[0].dtype, device=x.device) if act or split else dys[0]
    conv_dz_kernel[dz_grid](x, weight, b, st, *dys, S1, S2, dz, dwp, dbp, T, C, W, dz_bt, dz_bc, bias is not None,
                            start is not None, act, split, num_warps=DZ_WARPS)  # fmt: skip
    conv_dx_kernel[grid](dz, weight, st, dx, T, C, W, BT, BC, start is not None)
    dw = sum_partials(dwp, weight.dtype)
    db = sum_partials(dbp, bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


def dz_tile() -> tuple[int, int]:
    """(tokens, channels) per program of the backward's dz pass."""
    return DZ_TILE or (BT, BC)


conv_bwd_op_call = KernelCall("effarch::causal_conv1d_bwd", conv_bwd)
conv_bwd_op = conv_bwd_op_call.op
conv_bwd_split_op_call = KernelCall("effarch::causal_conv1d_split_bwd", conv_bwd_split)


def _bwd_fake(x, weight, bias):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        (torch.empty_like(bias) if bias is not None else x.new_empty(0)),
    )


@conv_bwd_op.register_fake
def _(dy, x, weight, bias, start, act):
    return _bwd_fake(x, weight, bias)


@conv_bwd_split_op_call.op.register_fake
def _(dy0, dy1, dy2, x, weight, bias, start, act, w0, w1):
    return _bwd_fake(x, weight, bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, start, act = inputs[:5]
    ctx.save_for_backward(x, weight, bias, start)
    ctx.act, ctx.widths = act, inputs[5:]


def _backward(ctx, dy):
    x, weight, bias, start = ctx.saved_tensors
    dx, dw, db = conv_bwd_op_call(dy.contiguous(), x, weight, bias, start, ctx.act)
    return dx, dw, (db if bias is not None else None), None, None


def _backward_split(ctx, *dys):
    x, weight, bias, start = ctx.saved_tensors
    w0, w1 = ctx.widths
    B, T, C = x.shape
    dys = [x.new_zeros(B, T, w) if d is None else d.contiguous() for d, w in zip(dys, (w0, w1, C - w0 - w1))]
    dx, dw, db = conv_bwd_split_op_call(*dys, x, weight, bias, start, ctx.act, w0, w1)
    return dx, dw, (db if bias is not None else None), None, None, None, None


conv_fwd_op_call.differentiable(_setup_context, _backward)
conv_fwd_split_op_call.differentiable(_setup_context, _backward_split)


def triton_supports(x: Tensor, weight: Tensor, activation: str | None, cu_seqlens: Tensor | None) -> bool:
    """CUDA tensors (or the Triton interpreter), x [B, T, C] in float32 / bf16 / fp16, width 1-8, activation None
    or "silu", and cu_seqlens only with B = 1."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.shape[1] == 0:
        return False
    if weight.dim() != 2 or not 1 <= weight.shape[1] <= MAX_WIDTH or activation not in (None, "silu"):
        return False
    return cu_seqlens is None or x.shape[0] == 1


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    cu_seqlens: Tensor | None,
    splits: tuple[int, ...] | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """See `effarch.ops.conv.causal_conv1d`; inputs as `triton_supports` accepts. With `splits` (channel widths
    summing to C) y comes as one tensor per width: three contiguous outputs of one launch when the widths are
    multiples of the channel blocks, else views of one."""
    start = None
    if cu_seqlens is not None:
        T = x.shape[1]
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        doc = torch.searchsorted(cu[1:], torch.arange(T, device=x.device), right=True)
        start = cu[doc].to(torch.int32)
    act = activation == "silu"
    if splits is not None and SPLIT_OUTPUTS and splitable(splits):
        return conv_fwd_split_op_call(x.contiguous(), weight.contiguous(), bias, start, act, splits[0], splits[1])
    y = conv_fwd_op_call(x.contiguous(), weight.contiguous(), bias, start, act)
    return y if splits is None else y.split(list(splits), dim=-1)


def splitable(splits: tuple[int, ...]) -> bool:
    """Whether the kernels can write (and read the gradients of) outputs of these widths apart: three, each a
    multiple of the channel blocks of the forward and of the backward's dz pass."""
    block = math.lcm(BC, dz_tile()[1])
    return len(splits) == 3 and all(w > 0 and w % block == 0 for w in splits)
