"""The kernels' per-program partial sums (weight gradients summed across the programs that each saw a share of
the rows) reduced in one Triton launch that also casts to the parameter's dtype.

In PyTorch `part.sum(0).to(weight.dtype)` is two launches; a 24-layer Gated DeltaNet step has about 200 of them
(RMSNorm, gated norm and short-convolution weights, the gates' parameters). Each program here sums a block of
columns over every row in float32, in row order, and stores the result once in the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effarch.ops.grid import cdiv

BLOCK_ROWS, BLOCK_COLS = 32, 128


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
        _sum_rows[(cdiv(C, BLOCK_COLS),)](part, out, R, C, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return out
