"""Triton kernels of the selective scan (Mamba's S6): a forward and a backward that walk each sequence token by
token with the state in registers.

`selective_scan_triton` has the semantics of `effarch.ops.scan.selective_scan_reference`; `triton_supports`
says whether a call can run here (Triton importable, tensors on a GPU or the Triton interpreter on, supported
dtypes and sizes). Importing this package never fails for want of Triton.
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
MAX_N = 256  # d_state: the backward keeps several [channels, N] float32 tiles in registers

if HAS_TRITON:
    from effarch.ops.scan.triton.ops import selective_scan_triton
else:

    def selective_scan_triton(*args, **kwargs):
        raise RuntimeError("selective_scan_triton needs Triton, which is not installed")


def triton_supports(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    **kwargs,
) -> bool:
    """True when `selective_scan_triton` can run this call (arguments as it takes them; shapes are assumed
    valid): token tensors of float32, bfloat16 or float16 on a GPU (or under the interpreter), N <= 256."""
    if not HAS_TRITON:
        return False
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if any(t is not None and t.dtype not in KERNEL_DTYPES for t in (x, dt, B, C, z)):
        return False
    return A.dim() == 2 and A.shape[1] <= MAX_N


__all__ = ["selective_scan_triton", "triton_supports", "HAS_TRITON", "KERNEL_DTYPES", "MAX_N"]
