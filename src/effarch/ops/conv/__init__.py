"""Causal depthwise short convolution over time (+ SiLU), the input stage of DeltaNet, Gated DeltaNet, GLA and Mamba
layers, as one fused Triton kernel on [B, T, C] (`effarch.ops.conv.kernels`, imported on first use so the package
never needs Triton). The PyTorch form `effarch.layers.conv.short_conv` is the reference.

On the GPU the PyTorch form transposes to channels-first for `F.conv1d`, concatenates the zero tail and transposes
back: a large Gated DeltaNet training step on an H200 spent 87 ms in the depthwise conv kernels and most of 122 ms of
copies around them (of 668 ms). The kernel reads x and writes y once, in place of all of that.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

from effarch.ops.kernel_fallback import KernelFallback, import_once, kernel_or_reference

_THIS = sys.modules[__name__]  # this module, where the loaded kernels are kept (see import_once)
_triton: tuple[Callable, Callable] | ImportError | None = None

_fallback = KernelFallback("causal_conv1d", "the PyTorch convolution")

# Layers use the kernel on CUDA; EFFARCH_CONV_TRITON=0 keeps the PyTorch convolution (`causal_conv1d_triton` runs
# the kernel directly either way).
AUTO_TRITON = os.environ.get("EFFARCH_CONV_TRITON", "1") != "0"


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def _load() -> tuple[Callable, Callable] | ImportError:
    return import_once(_THIS, "effarch.ops.conv.kernels", ("causal_conv1d_triton", "triton_supports"))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    cu_seqlens: torch.Tensor | None,
    reference: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
    splits: tuple[int, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """y [B, T, C] = act(sum_j weight[:, j] x_{t - (W-1-j)} + bias), zero before each sequence's start: from the
    kernel for CUDA tensors it supports when enabled (AUTO_TRITON), else from `reference()` (also when the kernel
    fails to build: reported once per shape). With `splits` (widths summing to C), y's channels as one tensor per
    width (`reference` returns them so too): convolutions joined side by side, each output contiguous where the
    kernel can write them apart."""
    key = (x.shape[-1], weight.shape[-1], x.dtype, weight.dtype, activation, cu_seqlens is None, splits)
    return kernel_or_reference(
        _THIS, _load, key, x, (x, weight, activation, cu_seqlens), (x, weight, bias, activation, cu_seqlens, splits),
        reference,
    )  # fmt: skip


__all__ = ["causal_conv1d", "AUTO_TRITON"]
