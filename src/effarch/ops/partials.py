"""The kernels' per-program partial sums (weight gradients summed across the programs that each saw a share of
the rows) reduced in one Triton launch that also casts to the parameter's dtype.

In PyTorch `part.sum(0).to(weight.dtype)` is two launches; a 24-layer Gated DeltaNet step has about 200 of them
(RMSNorm, gated norm and short-convolution weights, the gates' parameters). Each program here sums a block of
columns over every row in float32 and stores the result once in the output dtype.

The column block shrinks with the column count so that there are enough programs to keep many SMs reading: a
norm's weight partials are [1024, 1024], and 8 programs of 128 columns each walked 512 KB one tile at a time
(about 50 us a call on an H200, some 120 calls a Gated DeltaNet step). Each program reads tiles of TILE elements
(rows x columns), the columns at least MIN_COLS wide (32 bytes, one memory sector per row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effarch.ops.grid import cdiv, next_power_of_2

TILE = 4096  # elements per loaded tile
MIN_COLS, MAX_COLS = 8, 128
PROGRAMS = 256  # programs aimed for (about two per SM of an H200) before columns narrow to MIN_COLS


@triton.jit
def _sum_rows(P, OUT, R, C, BR: tl.constexpr, BC: tl.constexpr):
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = cols < C
    acc = tl.zeros([BC], dtype=tl.float32)
    for r in range(0, R, BR):
        rows = r + tl.arange(0, BR)
        m = (rows < R)[:, None] & cm[None, :]
        acc += tl.sum(tl.load(P + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0), axis=0)
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=cm)


def sum_partials(part: Tensor, dtype: torch.dtype) -> Tensor:
    """part [R, ...] float32 -> its sum over the first dimension [...] in `dtype`. Called inside the kernels'
    backward functions (never traced by torch.compile: those run as opaque custom ops there)."""
    part = part.contiguous()
    out = torch.empty(part.shape[1:], dtype=dtype, device=part.device)
    R, C = part.shape[0], out.numel()
    if R == 0:
        return out.zero_()
    if C:
        bc = column_block(C)
        br = min(TILE // bc, next_power_of_2(R))
        _sum_rows[(cdiv(C, bc),)](part, out, R, C, BR=br, BC=bc)
    return out


def column_block(C: int) -> int:
    """Columns per program for C columns: the widest power of two (MIN_COLS..MAX_COLS) that still gives about
    PROGRAMS programs."""
    return max(MIN_COLS, min(MAX_COLS, next_power_of_2(cdiv(C, PROGRAMS))))
