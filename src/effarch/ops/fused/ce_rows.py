"""One Triton pass per row of a chunk's logits for the chunked linear cross-entropy (effarch.ops.cross_entropy):
the row's loss logsumexp(x) - x_y, and the logits overwritten in place by the loss's gradient
(softmax(x) - onehot(y)) * scale.

The PyTorch form of the same step casts the 16-bit logits to float32, takes logsumexp, then subtracts, exponentiates,
scatters and scales in float32 and casts back for the two products: about ten passes over a [C, vocab] float32
buffer. Here each row is read twice (an online max and sum, then the gradient) and written once, in the logits'
dtype, with float32 arithmetic in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from effarch.ops.fused import empty_like
from effarch.ops.grid import next_power_of_2

BLOCK = 4096  # vocabulary entries per step of a row
WARPS = 8


@triton.jit
def _ce_rows_kernel(L, Y, S, LOSS, V, stride, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Program r: row r of L [C, V] (row stride `stride`), target Y[r] (in [0, V)), scale S[r] (float32). Writes
    LOSS[r] = logsumexp(L[r]) - L[r, Y[r]] (float32) and, with WRITE_GRAD, L[r] = (softmax(L[r]) - onehot) S[r]."""
    r = tl.program_id(0).to(tl.int64)
    row = L + r * stride
    cols = tl.arange(0, BLOCK)
    # Online max and sum of exponentials, one running pair per lane, merged at the end.
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes still at -inf (nothing seen) keep s = 0 without forming inf - inf
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), axis=0))
    y = tl.load(Y + r)
    tl.store(LOSS + r, lse - tl.load(row + y).to(tl.float32))
    if WRITE_GRAD:
        scale = tl.load(S + r)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(row + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(start + cols == y, 1.0, 0.0)) * scale
            tl.store(row + start + cols, g.to(L.dtype.element_ty), mask=mask)


def ce_rows_(logits: Tensor, targets: Tensor, scale: Tensor | None) -> Tensor:
    """Row losses [C] float32 of logits [C, V] (unit column stride) against targets [C] (int, in [0, V)); with
    `scale` ([C] float32) the logits are overwritten by the gradient (softmax - onehot) * scale, in their dtype."""
    C, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_: logits need unit column stride")
    loss = empty_like(logits, dtype=torch.float32, shape=(C,))
    if C:
        block = min(BLOCK, next_power_of_2(max(V, 1)))
        _ce_rows_kernel[(C,)](
            logits, targets.contiguous(), loss if scale is None else scale.contiguous(), loss, V, logits.stride(0),
            BLOCK=block, WRITE_GRAD=scale is not None, num_warps=WARPS,
        )  # fmt: skip
    return loss
