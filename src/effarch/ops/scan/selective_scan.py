"""The selective scan of Mamba (S6) behind one call, dispatching between the step loop, the parallel scan and
the Triton kernels."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from effarch.ops.kernel_fallback import KernelFallback, import_once
from effarch.ops.scan.parallel import selective_scan_parallel
from effarch.ops.scan.reference import selective_scan_reference

_THIS = sys.modules[__name__]  # this module, where the loaded kernels are kept (see import_once)

BACKENDS = ("auto", "reference", "torch", "triton")

_triton: tuple[Callable, Callable] | ImportError | None = None
_fallback = KernelFallback("selective_scan", "the PyTorch parallel scan")


def _load_triton() -> tuple[Callable, Callable] | ImportError:
    """(selective_scan_triton, triton_supports), or the ImportError met; imported once, lazily (so that tests
    can turn the Triton interpreter on before any kernel is defined)."""
    return import_once(_THIS, "effarch.ops.scan.triton", ("selective_scan_triton", "triton_supports"))


# The kernels pass every interpreter test and the CUDA tests on an H200 (Triton 3.6), where forward+backward ran 4-13x
# faster than the PyTorch scan (benchmarks/scan_ops.py, RESULTS.md), so "auto" picks them on CUDA;
# EFFARCH_SCAN_TRITON=0 keeps the PyTorch scan (backend="triton" always runs them).
AUTO_TRITON = os.environ.get("EFFARCH_SCAN_TRITON", "1") != "0"


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def _signature(x, dt, A, B, z) -> tuple:
    """What decides which kernels are built: dtypes, D, N, the groups of B/C, the gate, gradients or not."""
    return (
        x.dtype,
        dt.dtype,
        B.dtype,
        x.shape[-1],
        A.shape[-1],
        tuple(B.shape[2:]),
        z is not None,
        torch.is_grad_enabled(),
    )


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selective state-space scan, "Mamba" (arXiv 2312.00752), per channel d and state n:

        h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] B_t[n] x_t[d]
        y_t[d]   = sum_n C_t[n] h_t[d,n] + D[d] x_t[d],  times silu(z_t[d]) when z is given,

    with dt replaced by softplus(dt + dt_bias) when `dt_softplus` (dt + dt_bias otherwise).

    x, dt, z [B,T,D]; A [D,N] (negative for a decaying state); B, C [B,T,N], or [B,T,G,N] with group g
    shared by channels g*D/G .. (g+1)*D/G - 1; D, dt_bias [D]; initial_state / final state [N_seq,D,N]
    in float32 (float64 for float64 inputs), N_seq = B or the number of sequences in `cu_seqlens`
    (int64 [N_seq+1], packed sequences with B = 1). Returns (y [B,T,D] in x's dtype, final state or None).
    backend: "reference" (step loop), "torch" (parallel associative scan), "triton" (kernels that walk
    each sequence with the state in registers; float32, bfloat16 or float16 inputs, N <= 256, on CUDA or
    under TRITON_INTERPRET=1), "auto" ("triton" for CUDA tensors it supports unless EFFARCH_SCAN_TRITON=0, else
    "torch"; a shape whose kernels fail to build is reported once and then stays on "torch").
    """
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan backend {backend!r} is not one of {BACKENDS}")
    kwargs = dict(
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if backend == "reference":
        return selective_scan_reference(x, dt, A, B, C, D, z, **kwargs)
    if backend == "triton":
        triton = _load_triton()
        if isinstance(triton, ImportError):
            raise RuntimeError(
                f"selective_scan backend 'triton' is unavailable ({triton}); use backend='torch' or 'auto'"
            )
        return triton[0](x, dt, A, B, C, D, z, **kwargs)
    torch_form = lambda: selective_scan_parallel(x, dt, A, B, C, D, z, **kwargs)
    if backend == "auto" and AUTO_TRITON and _on_gpu(x):
        triton = _load_triton()
        if not isinstance(triton, ImportError) and triton[1](x, dt, A, B, C, D, z, **kwargs):
            kernel = lambda: triton[0](x, dt, A, B, C, D, z, **kwargs)  # bad input raises ValueError, not caught
            return _fallback.run(_signature(x, dt, A, B, z), kernel, torch_form)
    return torch_form()
