"""Run a Triton kernel with a PyTorch fallback: a kernel that cannot be built for a shape is reported once and
that shape then stays on the PyTorch form, instead of failing the model."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import TypeVar

R = TypeVar("R")


class KernelFallback:
    """Remembers the call signatures (`key`s) for which an op's Triton kernels failed to build or launch.

    `run(key, fast, slow)` returns `fast()`, or `slow()` when `fast` raised TypeError or RuntimeError (how
    Triton reports a kernel it cannot compile, e.g. out of shared memory or registers) or failed before for
    this key. The first failure per key warns once; later calls with that key go straight to `slow`.
    """

    def __init__(self, op: str, fallback: str):
        self.op, self.fallback = op, fallback
        self.failed: set[Hashable] = set()

    def run(self, key: Hashable, fast: Callable[[], R], slow: Callable[[], R]) -> R:
        if key not in self.failed:
            try:
                return fast()
            except (TypeError, RuntimeError) as e:
                self.failed.add(key)
                warnings.warn(
                    f"{self.op}: Triton kernels failed for {key} ({type(e).__name__}: {e}); "
                    f"using {self.fallback} for this shape",
                    stacklevel=3,
                )
        return slow()
