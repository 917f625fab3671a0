"""Several bias-free linear projections of one input as one autograd node (used by attention, GLA, DeltaNet and
Gated DeltaNet).

A mixer projects the same x to q, k, v, gates, ...: with one nn.Linear each, autograd forms dx as one matrix
product per projection and adds them one by one (on an H200, 145 bf16 adds per step of a 24-layer GLA model at
8K x 4 tokens, 3.7% of the step). Training on an H200 (bf16, 8K x 4, steps replayed from a CUDA graph): GLA 176.3 ->
179.3 thousand tokens/s, Gated DeltaNet 129.5 -> 131.0. Here the backward accumulates dx in place (`addmm_`), each product adding onto
the last, and takes each weight's gradient as before; the forward is the same products. Parameters stay separate
modules (state dicts, conversions and initialisation are untouched).

`project(x, layers)` takes that path when SHARED_PROJECTIONS is on (the default; EFFARCH_SHARED_PROJECTIONS=0 at
import, or the attribute set to False, calls each layer), two or more layers are given, none has a bias, their weights have x's dtype, autocast is off and a
gradient is needed; otherwise it calls each layer.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

SHARED_PROJECTIONS = os.environ.get("EFFARCH_SHARED_PROJECTIONS", "1") != "0"


class _SharedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        dx = None
        dws = []
        for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
            if g is None:
                dws.append(None)
                continue
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[0]:
                dx = g2 @ w if dx is None else dx.addmm_(g2, w)
            dws.append(g2.t() @ x2 if ctx.needs_input_grad[1 + i] else None)
        if dx is None and ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x2)
        return (None if dx is None else dx.reshape(x.shape)), *dws


def project(x: torch.Tensor, layers: list[nn.Linear | torch.Tensor | None] | tuple) -> list:
    """[layer(x) for each layer] (None where the layer is None), in one autograd node where the module docstring
    says. A layer may also be a weight tensor [out, in] (projections joined by the caller: F.linear(x, weight))."""
    present = [m for m in layers if m is not None]
    weights = [m if isinstance(m, torch.Tensor) else m.weight for m in present]
    shared = (
        SHARED_PROJECTIONS
        and len(present) > 1
        and all(getattr(m, "bias", None) is None for m in present)
        and all(w.dtype == x.dtype for w in weights)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
        and (x.requires_grad or any(w.requires_grad for w in weights))
    )
    if not shared:
        return [None if m is None else (F.linear(x, m) if isinstance(m, torch.Tensor) else m(x)) for m in layers]
    outs = iter(_SharedInputLinear.apply(x, *weights))
    return [None if m is None else next(outs) for m in layers]
