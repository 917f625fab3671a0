"""The unified linear recurrence (linear attention, linear RNNs, SSMs, delta-rule memories) behind one call."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch

from effarch.ops.kernel_fallback import KernelFallback, import_once
from effarch.ops.linear.checks import check_inputs
from effarch.ops.linear.chunk import linear_recurrence_chunked
from effarch.ops.linear.parallel import linear_recurrence_parallel
from effarch.ops.linear.reference import linear_recurrence_reference

_THIS = sys.modules[__name__]  # this module, where the loaded kernels are kept (see import_once)

BACKENDS = ("auto", "reference", "torch", "triton")
PARALLEL_MAX_T = 64  # the "torch" backend uses the quadratic form up to this length, chunks beyond

_triton: tuple[Callable, Callable] | ImportError | None = None
_warned: set[str] = set()


def _load_triton() -> tuple[Callable, Callable] | ImportError:
    """(linear_recurrence_triton, triton_supports), or the ImportError met; imported once, lazily."""
    return import_once(_THIS, "effarch.ops.linear.triton", ("linear_recurrence_triton", "triton_supports"))


def _torch_forms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    fn = linear_recurrence_parallel if q.shape[1] <= PARALLEL_MAX_T else linear_recurrence_chunked
    try:
        return fn(q, k, v, **kwargs)
    except NotImplementedError as e:
        if str(e) not in _warned:  # once per unsupported case, not once per call
            _warned.add(str(e))
            warnings.warn(f"{e}; falling back to the token-by-token reference (slow)", stacklevel=3)
        return linear_recurrence_reference(q, k, v, **kwargs)


def linear_recurrence(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_t = scale * q_t S_t with S_t = D_t S_{t-1} + k_t^T v_t ("additive") or
    S_t = D_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t ("delta"), D_t = diag(exp(log_decay_t)).

    q, k [B,T,H,K]; v [B,T,H,V]; log_decay None, [H], [B,T,H] or [B,T,H,K]; beta [B,T,H] (delta). q and k may
    have G heads where G divides H (key groups, as Mamba2's B and C: group g serves heads g*H/G .. (g+1)*H/G - 1);
    the Triton path then keeps only the G heads for the backward instead of H copies;
    initial_state / final state [N,H,K,V] float32 (N = B, or the number of sequences in cu_seqlens);
    cu_seqlens int64 [N+1] marks packed sequences when B = 1. Returns (o [B,T,H,V], final_state or None).
    """
    if backend not in BACKENDS:
        raise ValueError(f"linear_recurrence backend {backend!r} is not one of {BACKENDS}")
    kwargs = dict(
        log_decay=log_decay,
        beta=beta,
        rule=rule,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    if backend == "reference":
        return linear_recurrence_reference(q, k, v, **kwargs)
    check_inputs(q, k, v, log_decay, beta, rule, scale, initial_state, cu_seqlens)
    if backend in ("triton", "auto") and q.is_cuda:
        q, k, v = _autocast_inputs(q, k, v)
    if backend == "triton":
        triton = _load_triton()
        if isinstance(triton, ImportError):
            raise RuntimeError(
                f"linear_recurrence backend 'triton' is unavailable ({triton}); use backend='torch' or 'auto'"
            )
        return triton[0](q, k, v, **kwargs)
    torch_form = lambda: _torch_forms(q, k, v, **kwargs)  # noqa: E731
    if backend == "auto" and _on_gpu(q):
        triton = _load_triton()
        if not isinstance(triton, ImportError) and triton[1](q=q, k=k, v=v, **kwargs):
            # A kernel that cannot be built for this shape (e.g. out of shared memory) is reported once; the
            # shape then stays on the PyTorch form instead of failing the model.
            kernel = lambda: triton[0](q, k, v, **kwargs)  # noqa: E731
            return _fallback.run(_signature(q, v, kwargs), kernel, torch_form)
    return torch_form()


_fallback = KernelFallback("linear_recurrence", "the PyTorch chunked form")


def _autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under CUDA autocast, q, k, v in the autocast dtype. Feature maps such as L2 normalisation run in
    float32 under autocast; a float32 q would otherwise pull the whole kernel onto exact float32 products,
    many times slower than the 16-bit tensor-core path the rest of the model runs on."""
    if not torch.is_autocast_enabled("cuda"):
        return q, k, v
    dt = torch.get_autocast_dtype("cuda")
    return q.to(dt), k.to(dt), v.to(dt)


def _on_gpu(q: torch.Tensor) -> bool:
    return q.is_cuda


def _signature(q: torch.Tensor, v: torch.Tensor, kwargs: dict) -> tuple:
    g = kwargs["log_decay"]
    return (kwargs["rule"], q.dtype, q.shape[-1], v.shape[-1], None if g is None else g.dim(), torch.is_grad_enabled())


__all__ = [
    "linear_recurrence",
    "linear_recurrence_reference",
    "linear_recurrence_chunked",
    "linear_recurrence_parallel",
    "BACKENDS",
    "PARALLEL_MAX_T",
]
