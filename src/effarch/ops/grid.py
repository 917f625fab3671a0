"""Host-side launch arithmetic for the Triton kernels, in plain Python.

Triton's `cdiv` and `next_power_of_2` are constexpr functions in recent releases: callable from the host, but
through a wrapper that costs a few microseconds per call. A training step sizes thousands of launches, so the
kernel modules use these instead.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    """ceil(x / y) for integers, y > 0."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
