"""Host-side launch arithmetic for the Triton kernels, in plain Python, and the small index tensors they share.

Triton's `cdiv` and `next_power_of_2` are constexpr functions in recent releases: callable from the host, but
through a wrapper that costs a few microseconds per call. A training step sizes thousands of launches, so the
kernel modules use these instead.
"""

from __future__ import annotations

import torch

from effarch.ops.custom_op import tracing


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for integers, y > 0."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


# Small index tensors of a dense batch (sequence offsets, chunk tables) depend only on the shape: built once per
# device and shape and reused, they cost no launches after the first call (a linear layer built its chunk table
# in about ten tiny launches, forward and backward, every step). Entries are never evicted, since a captured CUDA
# graph may hold their addresses; past CACHE_LIMIT shapes new ones are built at each call instead. Nothing is
# stored while a graph is captured: tensors allocated then belong to the graph's memory pool.
_CACHE: dict[tuple, object] = {}
CACHE_LIMIT = 1024


def cached(key: tuple, make):
    """make(), reused for equal keys (which must include the device); `make` returns read-only tensors."""
    if tracing():  # traced code makes its own (a traced tensor must not be kept)
        return make()
    value = _CACHE.get(key)
    if value is None:
        value = make()
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not capturing and len(_CACHE) < CACHE_LIMIT:
            _CACHE[key] = value
    return value


def dense_offsets(n: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[0, length, 2 length, ..., n length] (the cu_seqlens of n sequences of `length` tokens), cached."""
    key = ("offsets", n, length, str(device), dtype)
    return cached(key, lambda: torch.arange(n + 1, device=device, dtype=dtype) * length)
