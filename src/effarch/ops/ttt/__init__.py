"""TTT-Linear's sequential mini-batch loop as one Triton kernel, for inference (no autograd).

The PyTorch form in `effarch.layers.mixers.ttt` is the reference: it launches a dozen kernels per mini-batch
and layer, so prefill at 16K tokens spends seconds on launches. Here one program per (sequence, head) walks
the mini-batches with the fast weights in registers; gradients are not supported (training keeps the PyTorch
form, whose steps autograd differentiates).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from effarch.ops.kernel_fallback import KernelFallback, import_once, kernel_or_reference

_THIS = sys.modules[__name__]  # this module, where the loaded kernels are kept (see import_once)
_triton: tuple[Callable, Callable] | ImportError | None = None

_fallback = KernelFallback("ttt_linear_minibatch", "the PyTorch loop")

# Layers use the kernel on CUDA when nothing needs a gradient (on an H200 it matched the PyTorch loop to 5e-7 and
# ran a layer's prefill 9.5-12x faster); EFFARCH_TTT_TRITON=0 keeps the PyTorch loop.
AUTO_TRITON = os.environ.get("EFFARCH_TTT_TRITON", "1") != "0"


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def _load() -> tuple[Callable, Callable] | ImportError:
    return import_once(_THIS, "effarch.ops.ttt.kernels", ("ttt_minibatch_triton", "triton_supports"))


def ttt_minibatch(
    q: torch.Tensor,
    k: torch.Tensor,
    target: torch.Tensor,
    eta: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    state: dict,
    size: int,
    reference: Callable[[], tuple[torch.Tensor, dict]],
) -> tuple[torch.Tensor, dict]:
    """The read-outs z [B,T,H,K] (before the output LayerNorm) and the new state {W0, c0, W, c} of the
    mini-batch loop: from the kernel for CUDA tensors it supports (see `kernels.triton_supports`) when enabled
    (AUTO_TRITON), else from `reference()` (also when the kernel fails to build: reported once per shape)."""
    key = (tuple(q.shape[2:]), size, q.device.type)
    return kernel_or_reference(
        _THIS, _load, key, q, (q, gamma, state, size), (q, k, target, eta, gamma, beta, state, size), reference
    )
