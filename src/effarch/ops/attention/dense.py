"""Dense softmax attention, o = softmax(scale * q k^T + mask) v ("Attention Is All You Need", arXiv 1706.03762).

Layout [B, T, H, D] as in flash-attn. Query heads are grouped contiguously over the key/value heads
(GQA, arXiv 2305.13245): query head h reads kv head h // (HQ // HKV). A causal mask is aligned
bottom-right, so a query block appended after a cache of Tk - Tq keys sees the whole cache.
`cu_seqlens` (B = 1) keeps packed documents apart; `window` limits a query to its last `window` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_NO_PLAN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, T, H, D] tensors; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if cu_seqlens is not None and (q.shape[0] != 1 or q.shape[1] != k.shape[1]):
        raise ValueError("attention with cu_seqlens needs B = 1 and equal query and key lengths")


def attention_mask(
    tq: int,
    tk: int,
    *,
    causal: bool,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor | None:
    """Boolean [tq, tk] mask, True where a query may attend; None when everything is visible."""
    if not causal and window is None and cu_seqlens is None:
        return None
    qi = torch.arange(tq, device=device)[:, None] + (tk - tq)
    kj = torch.arange(tk, device=device)[None, :]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        keep &= kj <= qi
    if window is not None:
        keep &= (qi - kj < window) & (kj - qi < window)
    if cu_seqlens is not None:
        doc = torch.searchsorted(cu_seqlens[1:].to(device), torch.arange(tk, device=device), right=True)
        keep &= doc[:, None] == doc[None, :]
    return keep


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec: explicit scores and softmax in the input precision (use float64 for tight checks)."""
    _check(q, k, v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    keep = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, cu_seqlens=cu_seqlens, device=q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows give 0, as in flash-attn
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention. q [B, Tq, HQ, D], k [B, Tk, HKV, D], v [B, Tk, HKV, Dv] -> [B, Tq, HQ, Dv].

    backend: "reference" (explicit softmax) or "torch"/"auto" (scaled_dot_product_attention, which
    reaches the flash / cuDNN kernels on GPU when no explicit mask is needed).
    """
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale, window=window, cu_seqlens=cu_seqlens)
    if backend not in ("auto", "torch"):
        raise ValueError(f"attention backend {backend!r} is not one of 'auto', 'torch', 'reference'")
    _check(q, k, v, cu_seqlens)
    tq, tk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[2] != k.shape[2]
    simple_causal = causal and tq == tk and window is None and cu_seqlens is None
    if (
        simple_causal
        or (not causal and window is None and cu_seqlens is None)
        or (causal and tq == 1 and window is None)
    ):
        is_causal = simple_causal
        if q.is_cuda and tq != tk:
            # Decoding against a growing cache gives SDPA a new key length every step; keep the choice to
            # kernels that need no per-shape plan (cuDNN builds one per new shape).
            with sdpa_kernel(_NO_PLAN_BACKENDS):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    elif causal and window is not None and cu_seqlens is None and tq == tk and tq > 2 * window:
        out = _sliding_window(qt, kt, vt, window, scale, gqa)
    else:
        mask = attention_mask(tq, tk, causal=causal, window=window, cu_seqlens=cu_seqlens, device=q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _sliding_window(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None, gqa: bool
) -> torch.Tensor:
    """Causal sliding-window attention on [B, H, T, D] in blocks of `window` queries, each against its own and
    the previous block's keys: time and memory grow as T x window, where a [T, T] mask grows as T^2.

    Query r of block b (position bW + r) sees key c of the 2W keys [(b-1)W, (b+1)W) (position (b-1)W + c) when
    0 <= (bW + r) - ((b-1)W + c) < W, i.e. r < c <= W + r; block 0 has no previous block.
    """
    B, H, T, D = q.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, d] -> [B, h, nb, W, d]
        return F.pad(x, (0, 0, 0, pad)).unflatten(2, (nb, W))

    def with_previous(x: torch.Tensor) -> torch.Tensor:  # [B, h, nb, W, d] -> [B * nb, h, 2W, d]
        prev = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1]], dim=2)
        return torch.cat([prev, x], dim=3).transpose(1, 2).flatten(0, 1)

    qb = blocks(q).transpose(1, 2).flatten(0, 1)  # [B * nb, H, W, D]
    kb, vb = with_previous(blocks(k)), with_previous(blocks(v))
    r = torch.arange(W, device=q.device)[:, None]
    c = torch.arange(2 * W, device=q.device)[None, :]
    visible = (c > r) & (c <= W + r)  # [W, 2W]
    mask = visible.expand(nb, W, 2 * W).clone()
    mask[0] &= c >= W
    mask = mask[None, :, None].expand(B, nb, 1, W, 2 * W).flatten(0, 1)  # [B * nb, 1, W, 2W]
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.unflatten(0, (B, nb)).transpose(1, 2).flatten(2, 3)[:, :, :T]
