"""Triton kernels for the unified linear recurrence: chunked forward/backward and a fused decoding kernel.

`linear_recurrence_triton` has the semantics of `effarch.ops.linear.linear_recurrence_reference`;
`triton_supports` says whether a call can run here (Triton importable, tensors on a GPU or the Triton
interpreter on, supported dtypes and sizes). Importing this package never fails for want of Triton.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the package must import cleanly without Triton; triton_supports() then says no
    HAS_TRITON = False

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_K = 256

if HAS_TRITON:
    from effarch.ops.linear.triton.ops import (
        RECURRENT_MAX_T,
        linear_recurrence_step_triton,
        linear_recurrence_triton,
    )
else:
    RECURRENT_MAX_T = 0

    def linear_recurrence_triton(*args, **kwargs):
        raise RuntimeError("linear_recurrence_triton needs Triton, which is not installed")

    def linear_recurrence_step_triton(*args, **kwargs):
        raise RuntimeError("linear_recurrence_step_triton needs Triton, which is not installed")


def _runs_here(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    rule: str = "additive",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> bool:
    """True when `linear_recurrence_triton` can run this call (arguments as it takes them); shapes are
    assumed valid. The delta rule with per-key decay runs only forward (token by token)."""
    if not HAS_TRITON or not _runs_here(q.device):
        return False
    if q.dtype not in KERNEL_DTYPES or q.shape[-1] > MAX_K or q.dim() != 4:
        return False
    # Only head sizes the kernels were verified at on the GPU: powers of two from 16. Others (e.g. the
    # Taylor feature map's odd key widths) take the PyTorch chunked form.
    if not all(d >= 16 and d & (d - 1) == 0 for d in (q.shape[-1], v.shape[-1])):
        return False
    if rule == "delta" and log_decay is not None and log_decay.dim() == 4:
        tensors = (q, k, v, log_decay, beta, initial_state)
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
            return False
    return True


__all__ = ["linear_recurrence_triton", "linear_recurrence_step_triton", "triton_supports", "HAS_TRITON"]
