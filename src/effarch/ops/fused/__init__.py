"""Fused training parts as Triton kernels, each beside a plain PyTorch reference: RMSNorm with the residual
add, SwiGLU and rotary embeddings.

Every public function takes `backend="auto" | "reference" | "triton"`: "auto" runs the Triton kernel on CUDA
tensors of a kernel dtype when Triton imports and the reference otherwise; "triton" insists on the kernel
(also on CPU tensors when the Triton interpreter, TRITON_INTERPRET=1, is on). Importing this package never
fails for want of Triton.
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the package must import cleanly without Triton; "auto" then picks the reference
    HAS_TRITON = False

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "reference", "triton")
POISON = False  # tests set this: kernel outputs start as NaN, so an element no kernel wrote cannot pass


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether a call with `backend` on `tensors` runs the Triton kernel; raises when "triton" cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if backend == "reference":
        return False
    on_gpu = all(t.device.type == "cuda" for t in tensors)
    dtypes_ok = all(t.dtype in KERNEL_DTYPES for t in tensors)
    if backend == "auto":
        return HAS_TRITON and on_gpu and dtypes_ok
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs Triton, which is not installed")
    if not (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"):
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got devices {devices}")
    if not dtypes_ok:
        dtypes = sorted({str(t.dtype) for t in tensors})
        raise ValueError(f"backend='triton' supports float32, bfloat16 and float16, got dtypes {dtypes}")
    return True


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output buffer for a kernel; NaN-filled when POISON is set."""
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return out.fill_(float("nan")) if POISON else out


# The submodules use the helpers above, so they are imported after them.
from effarch.ops.fused.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from effarch.ops.fused.rotary import apply_rotary, apply_rotary_reference  # noqa: E402
from effarch.ops.fused.swiglu import swiglu, swiglu_reference  # noqa: E402

__all__ = [
    "HAS_TRITON",
    "apply_rotary",
    "apply_rotary_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "use_triton",
]
