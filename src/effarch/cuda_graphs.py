"""Capturing work in a CUDA graph, shared by the graphed training step, the graphed decode step and the training
benchmark.

A graph replays the captured kernels with one launch, so a step whose host issues kernels more slowly than the GPU
runs them (thousands of small launches: a linear-attention training step at 24 layers issues about 2,500) runs at
the GPU's pace. Capture needs the work to be warm first (lazy initialisation, Triton compiles and autotuning,
allocator pools), run on a side stream, and free of host syncs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def warm_up(fn: Callable[[], Any], device: torch.device, times: int = 1) -> None:
    """Run `fn` `times` on a side stream, as capture needs before it, and make the current stream wait for it."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    current.wait_stream(side)


def capture(fn: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, what `fn` returned while captured): replaying the graph reruns `fn`'s kernels on the same buffers."""
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
