"""Per-layer inference state: KV caches for attention, fixed-size states for recurrent mixers, and the
container that holds one entry per layer of a model.

Every entry reports `nbytes()`, which is how `effarch info` and the arena measure cache memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class KVCache:
    """Keys and values kept, `[B, T_kept, H_kv, D]` each; `offset` counts older tokens already dropped
    (windowed caches), so `seq_len` is the number of tokens processed.

    Rows of different lengths (a batch of prompts of different lengths) carry `lengths` [B] int64, each
    row's own token count: a row's kept tokens fill its last slots (right-aligned, so a new token is one
    more slot for every row) and the slots before them are padding that attention hides; `seq_len` is
    then the longest row's count. A cache straight from a packed call (`cu_seqlens`, B = 1) keeps the
    documents packed, so training on packed batches copies nothing; `unpack` makes them rows.
    """

    k: torch.Tensor
    v: torch.Tensor
    offset: int = 0
    lengths: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.offset + self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        self._check_unpacked("append to")
        lengths = None if self.lengths is None else self.lengths + k.shape[1]
        return KVCache(torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1), self.offset, lengths)

    def keep_last(self, n: int) -> KVCache:
        self._check_unpacked("trim")
        drop = max(0, self.k.shape[1] - n)
        if drop == 0:
            return self
        return KVCache(self.k[:, drop:], self.v[:, drop:], self.offset + drop, self.lengths)

    def unpack(self, keep: int | None = None) -> KVCache:
        """Packed documents `[1, N]` -> one right-aligned row per document `[n_docs, L_max]` with
        `lengths`, trimmed to the last `keep` slots (windowed caches); an unpacked cache is returned as is."""
        if self.cu_seqlens is None:
            return self
        cu = self.cu_seqlens.to(device=self.k.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        width = int(lengths.max()) if lengths.numel() else 0  # one host sync, when decoding starts
        token = torch.arange(self.k.shape[1], device=self.k.device)
        doc = torch.searchsorted(cu[1:], token, right=True)
        slot = token - cu[doc] + width - lengths[doc]
        k = self.k.new_zeros(lengths.numel(), width, *self.k.shape[2:])
        v = self.v.new_zeros(lengths.numel(), width, *self.v.shape[2:])
        k[doc, slot], v[doc, slot] = self.k[0], self.v[0]
        rows = KVCache(k, v, 0, lengths)
        return rows if keep is None else rows.keep_last(keep)

    def _check_unpacked(self, what: str) -> None:
        if self.cu_seqlens is not None:
            raise ValueError(f"cannot {what} a KVCache of packed documents; call unpack() to make them rows first")

    def nbytes(self) -> int:
        return tensor_bytes(self.k) + tensor_bytes(self.v)


class StaticKVCache:
    """Preallocated keys and values `[B, L_max, H_kv, D]` written in place at a device-side position.

    Nothing changes shape between decode steps, so a step can be captured once in a CUDA graph and
    replayed (as gpt-fast does). `pos` is the next buffer slot, an int64 tensor [] on the cache's device;
    `length` mirrors it on the host for code that runs outside graph replays. Slot i holds the token at
    absolute position `base + i` (`base` > 0 when a windowed cache had already dropped older tokens).

    Rows of different lengths (see `KVCache`) share the slots, right-aligned, and carry `lengths` [B]
    int64 on the device, advanced in place by every write: slot i of row b holds that row's token at
    position `i - (pos - lengths[b])`, and slots before `pos - lengths[b]` are padding.
    """

    def __init__(
        self, k: torch.Tensor, v: torch.Tensor, length: int, base: int = 0, lengths: torch.Tensor | None = None
    ):
        self.k, self.v = k, v
        self.pos = torch.tensor(length, dtype=torch.int64, device=k.device)
        self.length, self.base = length, base
        self.lengths = lengths

    @classmethod
    def from_kv(cls, cache: KVCache, max_len: int) -> StaticKVCache:
        """Room for `max_len` tokens in all (absolute count, as `seq_len` counts)."""
        cache = cache.unpack()
        B, T, H, D = cache.k.shape
        slots = max_len - cache.offset
        if slots < T:
            raise ValueError(f"max_len={max_len} is shorter than the {cache.seq_len} tokens already processed")
        k = cache.k.new_zeros(B, slots, H, D)
        v = cache.v.new_zeros(B, slots, H, cache.v.shape[-1])
        k[:, :T], v[:, :T] = cache.k, cache.v
        lengths = None if cache.lengths is None else cache.lengths.clone()
        return cls(k, v, T, base=cache.offset, lengths=lengths)

    @property
    def seq_len(self) -> int:
        return self.base + self.length

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store T new keys/values at pos..pos+T-1 (in place); returns their positions [T]."""
        positions = self.pos + torch.arange(k.shape[1], device=k.device)
        self.k.index_copy_(1, positions, k.to(self.k.dtype))
        self.v.index_copy_(1, positions, v.to(self.v.dtype))
        self.pos.add_(k.shape[1])
        if self.lengths is not None:
            self.lengths.add_(k.shape[1])
        self.length += k.shape[1]
        return positions

    def nbytes(self) -> int:
        return tensor_bytes(self.k) + tensor_bytes(self.v)


class RecurrentState(dict):
    """Named tensors of a recurrent mixer (matrix memory, conv tail, ...) plus the token count.

    Its size does not depend on how many tokens it has absorbed. A mixer whose output depends on absolute
    positions (rotary q/k) also keeps `lengths` [B] int64, each row's own token count, when its rows may
    differ (one state per packed document); it is not part of `nbytes`.
    """

    def __init__(self, *args, seq_len: int = 0, lengths: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seq_len = seq_len
        self.lengths = lengths

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.values() if isinstance(t, torch.Tensor))


class Cache:
    """One state per layer (None until the layer has run)."""

    def __init__(self, n_layers: int):
        self.layers: list = [None] * n_layers

    def __getitem__(self, i: int):
        return self.layers[i]

    def __setitem__(self, i: int, state) -> None:
        self.layers[i] = state

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def seq_len(self) -> int:
        for s in self.layers:
            if s is not None:
                return s.seq_len
        return 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers if s is not None)

    def per_layer_nbytes(self) -> list[int]:
        return [0 if s is None else s.nbytes() for s in self.layers]

    def to_static(self, max_len: int, *, consume: bool = False) -> Cache:
        """Same states with every KV cache preallocated to `max_len` tokens (recurrent states are already
        fixed-size). With `consume`, each layer's growing cache is dropped from this one as soon as it is
        copied, so the copy needs room for one layer more, not for a second whole cache; this cache is then
        empty."""
        out = Cache(len(self))
        for i, s in enumerate(self.layers):
            out[i] = StaticKVCache.from_kv(s, max_len) if isinstance(s, KVCache) else s
            if consume:
                self.layers[i] = None
                s = None
        return out
