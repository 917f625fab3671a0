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
    (windowed caches), so `seq_len` is the number of tokens processed."""

    k: torch.Tensor
    v: torch.Tensor
    offset: int = 0

    @property
    def seq_len(self) -> int:
        return self.offset + self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        return KVCache(torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1), self.offset)

    def keep_last(self, n: int) -> KVCache:
        drop = max(0, self.k.shape[1] - n)
        if drop == 0:
            return self
        return KVCache(self.k[:, drop:], self.v[:, drop:], self.offset + drop)

    def nbytes(self) -> int:
        return tensor_bytes(self.k) + tensor_bytes(self.v)


class RecurrentState(dict):
    """Named tensors of a recurrent mixer (matrix memory, conv tail, ...) plus the token count.

    Its size does not depend on how many tokens it has absorbed.
    """

    def __init__(self, *args, seq_len: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seq_len = seq_len

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
