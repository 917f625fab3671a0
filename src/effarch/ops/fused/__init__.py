"""Fused training parts as Triton kernels, each beside a plain PyTorch reference: RMSNorm with the residual
add, SwiGLU, rotary embeddings, GLA's log-sigmoid decay, Gated DeltaNet's gates and Mamba-2's step, decay and
scaled values; and the one switch that decides whether the layers use
them.

Every kernel function takes `backend="auto" | "reference" | "triton"`: "auto" runs the Triton kernel on CUDA
tensors of a kernel dtype when Triton imports and the reference otherwise; "triton" insists on the kernel
(also on CPU tensors when the Triton interpreter, TRITON_INTERPRET=1, is on).

The layers (RMSNorm, the block's residual add, the SwiGLU MLP, rotary embeddings) ask `enabled(device, dtype)`:
True on CUDA tensors of a kernel dtype when Triton imports, unless EFFARCH_FUSED=0 is set in the environment
(read at import) or `use_fused(False)` turned the kernels off. It is not part of a model's config: a kernel
choice changes no result beyond floating-point rounding, so configs stay portable.

Importing this package neither needs nor imports Triton: the kernel modules load on first use, so models on
the CPU never touch it, and tests can turn the interpreter on first.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from effarch.ops.fused.reference import (
    apply_rotary_reference,
    delta_gates_reference,
    gated_rms_norm_reference,
    log_sigmoid_decay_reference,
    rms_norm_reference,
    ssd_inputs_reference,
    swiglu_reference,
)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "EFFARCH_FUSED"
RMS_NORM_MAX_D = 8192  # the RMSNorm kernel holds a whole row in registers
POISON = False  # tests set this: kernel outputs start as NaN, so an element no kernel wrote cannot pass

# Found, not imported: importing Triton is left to the kernel modules, loaded on first use.
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Kernel functions by name, with the module that defines them: loaded on first access.
_LAZY = {
    "rms_norm": "effarch.ops.fused.norm",
    "gated_rms_norm": "effarch.ops.fused.gated_norm",
    "log_sigmoid_decay": "effarch.ops.fused.decay",
    "delta_gates": "effarch.ops.fused.delta_gates",
    "ssd_inputs": "effarch.ops.fused.ssd_inputs",
    "swiglu": "effarch.ops.fused.glu",
    "swiglu_packed": "effarch.ops.fused.glu",
    "apply_rotary": "effarch.ops.fused.rotary",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The switch ------------------------------------------------------------------------------------------------


def _mode_from_environment() -> bool:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "on", "yes", ""):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"environment variable {ENV_VAR}={value!r} must be 1 (fused kernels on CUDA) or 0 (off)")


_mode: bool | str = _mode_from_environment()


def enabled(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the layers run the fused Triton kernels for tensors on `device` of `dtype`.

    True on CUDA for float32, bfloat16 and float16 when Triton imports and the kernels are on (see `use_fused`);
    never on another device unless `use_fused("force")` (tests running the kernels under TRITON_INTERPRET=1).
    """
    if _mode is False or dtype not in KERNEL_DTYPES:
        return False
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if device_type != "cuda" and _mode != "force":
        return False
    return HAS_TRITON


class _FusedChoice:
    """What `use_fused` returns: the choice is made already; as a context manager it restores the previous one."""

    def __init__(self, previous: bool | str):
        self.previous = previous

    def __enter__(self) -> _FusedChoice:
        return self

    def __exit__(self, *exc) -> None:
        global _mode
        _mode = self.previous


def use_fused(mode: bool | str | None = True) -> _FusedChoice:
    """Turn the layers' fused kernels on (True: CUDA tensors), off (False), on for every device ("force", for
    tests under TRITON_INTERPRET=1), or back to what EFFARCH_FUSED says (None, read again now).

    Takes effect at once, for the whole process; used as `with use_fused(False): ...` the previous choice comes
    back at the end of the block.
    """
    global _mode
    if not (mode is None or isinstance(mode, bool) or mode == "force"):
        raise ValueError(f"use_fused mode={mode!r} is not one of True, False, 'force' or None")
    previous = _mode
    _mode = _mode_from_environment() if mode is None else mode
    return _FusedChoice(previous)


# The gated per-head norm runs wherever the fused kernels do; EFFARCH_GATED_NORM_TRITON=0 keeps HeadNorm and the
# gate in PyTorch alone (the other fused kernels stay on).
GATED_NORM_ON = os.environ.get("EFFARCH_GATED_NORM_TRITON", "1") != "0"


def gated_norm_enabled(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the linear-recurrence layers run their per-head RMSNorm and output gate as one fused kernel."""
    return GATED_NORM_ON and enabled(device, dtype)


# Helpers of the kernel modules -----------------------------------------------------------------------------


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


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """An output buffer for a kernel (x's shape, dtype and device unless given); NaN-filled when POISON is set."""
    out = torch.empty(x.shape if shape is None else shape, dtype=dtype or x.dtype, device=x.device)
    return out.fill_(float("nan")) if POISON else out


__all__ = [
    "ENV_VAR",
    "HAS_TRITON",
    "apply_rotary",
    "apply_rotary_reference",
    "enabled",
    "gated_norm_enabled",
    "gated_rms_norm",
    "gated_rms_norm_reference",
    "log_sigmoid_decay",
    "log_sigmoid_decay_reference",
    "delta_gates",
    "delta_gates_reference",
    "rms_norm",
    "rms_norm_reference",
    "ssd_inputs",
    "ssd_inputs_reference",
    "swiglu",
    "swiglu_packed",
    "swiglu_reference",
    "use_fused",
    "use_triton",
]
