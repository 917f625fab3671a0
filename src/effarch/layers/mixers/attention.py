"""Softmax attention with rotary embeddings: MHA, GQA or MQA by `n_kv_heads`, on scaled_dot_product_attention.

"Attention Is All You Need" (arXiv 1706.03762); grouped-query attention, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints" (arXiv 2305.13245). The state is a KV cache
that grows by 2 * n_kv_heads * head_dim values per token.
"""

from __future__ import annotations

import torch
from torch import nn

from effarch.cache import KVCache, StaticKVCache
from effarch.layers.base import TokenMixer, check_divisible
from effarch.layers.projections import project
from effarch.layers.rotary import apply_rotary, positions_from_cu_seqlens, rotary_angles
from effarch.ops.attention import attention
from effarch.registry import register_mixer


@register_mixer(
    "attn",
    family="full/grouped",
    paper="Attention Is All You Need (arXiv 1706.03762); GQA (arXiv 2305.13245)",
    debug=dict(n_heads=4, n_kv_heads=2),
)
class Attention(TokenMixer):
    """Multi-head softmax attention with RoPE; n_kv_heads < n_heads gives GQA, n_kv_heads = 1 MQA."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 8,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        rotary_dim: int | None = None,
        window: int | None = None,
        qk_norm: bool = False,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx)
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        check_divisible("n_heads", n_heads, "n_kv_heads", n_kv_heads)
        if head_dim % 2:
            raise ValueError(f"head_dim = {head_dim} must be even for rotary embeddings")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim = {rotary_dim} must be even and at most head_dim = {head_dim}")
        if window is not None and window < 1:
            raise ValueError(f"window = {window} must be a positive number of tokens or None")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_base, self.rotary_dim, self.window = rope_base, rotary_dim, window
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            from effarch.layers.norm import RMSNorm

            self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: torch.Tensor, state: KVCache | None = None, *, cu_seqlens: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, kv = project(x, (self.q_proj, self.kv_proj))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = kv.view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if state is not None and cu_seqlens is not None:
            raise ValueError("pass either a carried state or cu_seqlens (packed documents start fresh), not both")
        if isinstance(state, StaticKVCache):
            return self._forward_static(q, k, v, state, B, T)
        if state is not None and (state.lengths is not None or state.cu_seqlens is not None):
            return self._forward_rows(q, k, v, state.unpack(self._kept), B, T)
        if cu_seqlens is not None:
            q, k = self._rotate(q, k, positions_from_cu_seqlens(cu_seqlens, T))
        else:
            offset = 0 if state is None else state.seq_len
            q, k = self._rotate(q, k, torch.arange(offset, offset + T, device=x.device))
        new_state = KVCache(k, v) if state is None else state.append(k, v)
        o = attention(q, new_state.k, new_state.v, causal=self.causal, window=self.window, cu_seqlens=cu_seqlens)
        if cu_seqlens is not None:
            # One state per document, kept packed (and untrimmed) until a later call continues it.
            new_state = KVCache(k, v, cu_seqlens=cu_seqlens)
        elif self._kept is not None:
            # Keys older than the window can never be seen again: keep the cache bounded.
            new_state = new_state.keep_last(self._kept)
        return self.o_proj(o.reshape(B, T, -1)), new_state

    @property
    def _kept(self) -> int | None:
        """Keys a causal windowed cache keeps between calls (None: all)."""
        return self.window - 1 if self.window is not None and self.causal else None

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """q, k rotated to `positions` ([T] shared by the rows, or [B, T] each row its own)."""
        if not self.rotary_dim:
            return q, k
        cos, sin = rotary_angles(positions, self.rotary_dim, self.rope_base)
        return apply_rotary(q, cos, sin, self.rotary_dim), apply_rotary(k, cos, sin, self.rotary_dim)

    def _visible(self, query_slots: torch.Tensor, n_slots: int, row_start: torch.Tensor | None) -> torch.Tensor:
        """Which cache slots each query may see: [T, L], or [B, 1, T, L] when rows start at their own slot
        `row_start` [B] (earlier slots are a shorter row's padding). Built on the device, so it can be graphed."""
        key = torch.arange(n_slots, device=query_slots.device)
        visible = key[None, :] <= query_slots[:, None]  # unwritten slots stay hidden
        if self.window is not None:
            visible &= query_slots[:, None] - key[None, :] < self.window
        if row_start is not None:
            visible = visible & (key[None, :] >= row_start[:, None])[:, None, None, :]
        return visible

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, B: int, T: int):
        """Masked attention of q [B, T] over cache slots k, v [B, L] and the output projection."""
        qt = q.transpose(1, 2)
        kt, vt = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=visible, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _forward_static(self, q, k, v, state: StaticKVCache, B: int, T: int):
        """Decode / chunked prefill into a preallocated cache: shapes never change, so it can be graphed."""
        step = torch.arange(T, device=q.device)
        slots = state.pos + step  # buffer slots of the new tokens
        if state.lengths is None:
            q, k = self._rotate(q, k, state.base + slots)
            row_start = None
        else:  # rows of different lengths: each at its own position
            q, k = self._rotate(q, k, state.lengths[:, None] + step)
            row_start = state.pos - state.lengths
        state.write(k, v)
        return self._attend(q, state.k, state.v, self._visible(slots, state.max_len, row_start), B, T), state

    def _forward_rows(self, q, k, v, state: KVCache, B: int, T: int):
        """Continue rows of different lengths (right-aligned in the cache, see `KVCache`), each at its own
        position; the slots before a row's first token are masked."""
        if state.k.shape[0] != B:
            raise ValueError(f"the cache holds {state.k.shape[0]} rows but the input has batch {B}")
        q, k = self._rotate(q, k, state.lengths[:, None] + torch.arange(T, device=q.device))
        new_state = state.append(k, v)
        L = new_state.k.shape[1]
        slots = torch.arange(L - T, L, device=q.device)
        y = self._attend(q, new_state.k, new_state.v, self._visible(slots, L, L - new_state.lengths), B, T)
        if self._kept is not None:
            new_state = new_state.keep_last(self._kept)
        return y, new_state

    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window - 1)
        return 2 * batch * kept * self.n_kv_heads * self.head_dim * torch.tensor([], dtype=dtype).element_size()

    def flops_per_token(self, seq_len: int) -> float:
        ctx = seq_len if self.window is None else min(seq_len, self.window)
        return 4.0 * self.n_heads * self.head_dim * ctx / (2 if self.causal else 1)
