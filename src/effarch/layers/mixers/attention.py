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
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(state, StaticKVCache):
            return self._forward_static(q, k, v, state, B, T)
        offset = 0 if state is None else state.seq_len
        if self.rotary_dim:
            if cu_seqlens is not None:
                pos = positions_from_cu_seqlens(cu_seqlens, T)
            else:
                pos = torch.arange(offset, offset + T, device=x.device)
            cos, sin = rotary_angles(pos, self.rotary_dim, self.rope_base)
            q = apply_rotary(q, cos, sin, self.rotary_dim)
            k = apply_rotary(k, cos, sin, self.rotary_dim)
        new_state = KVCache(k, v) if state is None else state.append(k, v)
        o = attention(q, new_state.k, new_state.v, causal=self.causal, window=self.window, cu_seqlens=cu_seqlens)
        if self.window is not None and self.causal:
            # Keys older than the window can never be seen again: keep the cache bounded.
            new_state = new_state.keep_last(self.window - 1)
        return self.o_proj(o.reshape(B, T, -1)), new_state

    def _forward_static(self, q, k, v, state: StaticKVCache, B: int, T: int):
        """Decode / chunked prefill into a preallocated cache: shapes never change, so it can be graphed."""
        positions = state.pos + torch.arange(T, device=q.device)  # buffer slots of the new tokens
        if self.rotary_dim:
            cos, sin = rotary_angles(state.base + positions, self.rotary_dim, self.rope_base)
            q = apply_rotary(q, cos, sin, self.rotary_dim)
            k = apply_rotary(k, cos, sin, self.rotary_dim)
        state.write(k, v)
        key_pos = torch.arange(state.max_len, device=q.device)
        visible = key_pos[None, :] <= positions[:, None]  # [T, L_max]; unwritten slots stay hidden
        if self.window is not None:
            visible &= positions[:, None] - key_pos[None, :] < self.window
        qt = q.transpose(1, 2)
        kt, vt = state.k.transpose(1, 2).to(q.dtype), state.v.transpose(1, 2).to(q.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=visible, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state

    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window - 1)
        return 2 * batch * kept * self.n_kv_heads * self.head_dim * torch.tensor([], dtype=dtype).element_size()

    def flops_per_token(self, seq_len: int) -> float:
        ctx = seq_len if self.window is None else min(seq_len, self.window)
        return 4.0 * self.n_heads * self.head_dim * ctx / (2 if self.causal else 1)
