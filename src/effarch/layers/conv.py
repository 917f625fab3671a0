"""Short depthwise convolution over time (as in H3, Mamba, GLA/DeltaNet layers) with a carried tail.

Causal: y_t = act(sum_j w_j * x_{t-j} + b), j = 0..W-1; the state is the last W-1 inputs [N, W-1, C],
so a sequence run in pieces equals one run whole. `cu_seqlens` keeps packed documents from seeing each
other. Non-causal (bidirectional use): a centred window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effarch.layers.recompute import recomputed
from effarch.ops.conv import causal_conv1d


def _doc_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    return torch.searchsorted(cu_seqlens[1:], torch.arange(total, device=cu_seqlens.device), right=True)


def _depthwise(xx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise conv of xx [B, T+W-1, C] -> [B, T, C]. On CPU as W shifted products: PyTorch's CPU
    depthwise conv1d is orders of magnitude slower for these widths (seconds in float64)."""
    W, T = weight.shape[1], xx.shape[1] - weight.shape[1] + 1
    if xx.is_cuda:
        return F.conv1d(xx.transpose(1, 2), weight[:, None, :], bias, groups=xx.shape[2]).transpose(1, 2)
    y = sum(xx[:, j : j + T] * weight[:, j] for j in range(W))
    return y if bias is None else y + bias


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tail: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, T, C], weight [C, W] (weight[:, -1] multiplies the current token), tail [B, W-1, C].

    Returns (y [B, T, C], new tail [N, W-1, C] or None when not causal).
    """
    B, T, C = x.shape
    W = weight.shape[1]
    if not causal:
        left = (W - 1) // 2
        y = _depthwise(F.pad(x, (0, 0, left, W - 1 - left)), weight, bias)
        if cu_seqlens is not None:
            raise ValueError("a non-causal short convolution does not support cu_seqlens")
        return y, None
    if tail is not None and cu_seqlens is not None:
        raise ValueError("short_conv: pass either a carried tail or cu_seqlens, not both")
    if tail is None:
        tail = x.new_zeros(B, W - 1, C)
    xx = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    if cu_seqlens is None:
        y = _depthwise(xx, weight, bias)
        new_tail = xx[:, xx.shape[1] - (W - 1) :]
        return y, new_tail
    # Packed documents: tap j reads x_{t-j} only when it lies in the same document as t.
    doc = _doc_ids(cu_seqlens, T)
    y = x * weight[:, -1]
    for j in range(1, W):
        shifted = F.pad(x, (0, 0, j, 0))[:, :T]
        same = torch.zeros(T, dtype=torch.bool, device=x.device)
        same[j:] = doc[j:] == doc[:-j] if j < T else same[j:]
        y = y + shifted * same[None, :, None] * weight[:, -1 - j]
    if bias is not None:
        y = y + bias
    return y, packed_tails(x, cu_seqlens, W)


def packed_tails(x: torch.Tensor, cu_seqlens: torch.Tensor, W: int) -> torch.Tensor:
    """The last W-1 inputs of each packed sequence of x [1, T, C], zero-padded in front: [N, W-1, C]."""
    n = cu_seqlens.numel() - 1
    new_tail = x.new_zeros(n, W - 1, x.shape[2])
    for i in range(n):
        s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        seg = x[0, max(s, e - (W - 1)) : e]
        if seg.shape[0]:
            new_tail[i, W - 1 - seg.shape[0] :] = seg
    return new_tail


def fresh_tail(x: torch.Tensor, W: int) -> torch.Tensor:
    """The last W-1 inputs of x [B, T, C] after a zero start, zero-padded in front: [B, W-1, C]."""
    B, T, C = x.shape
    keep = x[:, max(0, T - (W - 1)) :]
    if keep.shape[1] == W - 1:
        # Outside training a copy of the W-1 tokens: a view would keep all of x (a prompt's projections) alive in
        # the stored state. Training drops the tails, and holds x for its backward anyway.
        return keep if torch.is_grad_enabled() else keep.clone()
    return torch.cat([x.new_zeros(B, W - 1 - keep.shape[1], C), keep], dim=1)


class ShortConvolution(nn.Module):
    """Depthwise conv of width `kernel_size` over time, optional SiLU, with a carried tail state."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        *,
        bias: bool = False,
        activation: str | None = "silu",
        causal: bool = True,
    ):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size = {kernel_size} must be at least 1")
        if activation not in (None, "silu"):
            raise ValueError(f"conv activation {activation!r} is not one of None, 'silu'")
        self.kernel_size, self.activation, self.causal = kernel_size, activation, causal
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self._init_weights()

    def _init_weights(self) -> None:
        with torch.no_grad():
            nn.init.uniform_(self.weight, -(self.kernel_size**-0.5), self.kernel_size**-0.5)

    def forward(self, x, tail=None, *, cu_seqlens=None, splits=None):
        """(y [B, T, C], new tail); with `splits` (channel widths summing to C) y as one tensor per width, each
        contiguous where the kernel writes them apart (a fresh start on the GPU; `effarch.ops.conv.kernels`)."""
        if self.causal and tail is None and x.shape[1] > 0:
            # A fresh start (training, prefill): the fused kernel on CUDA when switched on (`effarch.ops.conv`),
            # else the PyTorch form.
            return _fresh_conv(x, self.weight, self.bias, self.activation, cu_seqlens, splits)
        if torch.is_grad_enabled() and self.causal and cu_seqlens is None and tail is not None:
            # training from a carried tail: the last W-1 of tail + x
            y, new_tail = recomputed(self._conv_act, x, tail), torch.cat([tail.to(x.dtype), x], dim=1)[:, x.shape[1] :]
        else:
            y, new_tail = self._conv_act_tail(x, tail, cu_seqlens)
        return (y if splits is None else y.split(list(splits), dim=-1)), new_tail

    def _conv_act_tail(self, x, tail, cu_seqlens=None):
        y, new_tail = short_conv(x, self.weight, self.bias, tail=tail, cu_seqlens=cu_seqlens, causal=self.causal)
        return (F.silu(y) if self.activation == "silu" else y), new_tail

    def _conv_act(self, x, tail):
        return self._conv_act_tail(x, tail)[0]


def _fresh_form(x, weight, bias, activation, cu_seqlens):
    """y from a zero start in PyTorch; training keeps only x for the backward and recomputes the padded input,
    the conv and the SiLU, instead of holding two more copies of the activations."""

    def conv_act(x):
        y = short_conv(x, weight, bias, cu_seqlens=cu_seqlens)[0]
        return F.silu(y) if activation == "silu" else y

    return recomputed(conv_act, x) if torch.is_grad_enabled() and cu_seqlens is None else conv_act(x)


def _fresh_conv(x, weight, bias, activation, cu_seqlens, splits=None):
    """(y, new tail) of a causal conv from a zero start: the fused kernel on CUDA when switched on
    (`effarch.ops.conv`), else the PyTorch form. With `splits` (channel widths) y comes as one tensor per width."""

    def reference():
        y = _fresh_form(x, weight, bias, activation, cu_seqlens)
        return y if splits is None else y.split(list(splits), dim=-1)

    y = causal_conv1d(x, weight, bias, activation, cu_seqlens, reference=reference, splits=splits)
    W = weight.shape[1]
    return y, (fresh_tail(x, W) if cu_seqlens is None else packed_tails(x, cu_seqlens, W))


def joinable(convs) -> bool:
    """Whether short convolutions can run as one over their inputs side by side: causal, one width, one
    activation, all with a bias or none."""
    first = convs[0]
    return all(
        c.causal
        and c.kernel_size == first.kernel_size
        and c.activation == first.activation
        and (c.bias is None) == (first.bias is None)
        for c in convs
    )


def joined_fresh_conv(convs, x, cu_seqlens=None):
    """Short convolutions (`joinable`) from a zero start over their inputs side by side, x [B, T, sum of their
    channels], as one depthwise conv: one kernel launch each way where each conv would take its own, each as wide
    as all of them (the kernel moves data faster over more channels). Returns (each conv's output [B, T, C_i],
    each conv's new tail, a view of the joined one). The kernel writes the outputs apart, each contiguous, when it
    can (`effarch.ops.conv.kernels.splitable`): no copies of slices after it, no concatenated gradient before it."""
    weight = torch.cat([c.weight for c in convs])
    bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
    widths = tuple(c.weight.shape[0] for c in convs)
    ys, tail = _fresh_conv(x, weight, bias, convs[0].activation, cu_seqlens, splits=widths)
    return tuple(ys), tail.split(list(widths), dim=-1)
