"""Peak memory of a piece of work: the CUDA allocator's peak on GPU, tensor-allocation tracking on CPU.

PyTorch keeps no peak statistic for CPU memory, so on CPU we count the bytes of every tensor storage that
an operator creates while the work runs, release them when the storage is freed, and keep the maximum.
Storages that existed before (the weights) are added as a baseline by the caller.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CpuPeakMemory(TorchDispatchMode):
    """Context manager: `.peak` is the largest number of bytes held at once by storages created inside.

    Outputs that alias an input (views, in-place and out= updates, as the operator's schema declares)
    are not new memory and are skipped.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()
        self._aliasing: dict = {}  # operator -> does any output alias an input

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._tracked:
            self._tracked.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliasing = self._aliasing.get(func)
        if aliasing is None:
            aliasing = self._aliasing[func] = any(r.alias_info is not None for r in func._schema.returns)
        if aliasing:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def _has_storage(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("meta",) and t.layout == torch.strided


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class PeakMemory:
    """`with PeakMemory(device, baseline) as m: work()` then `m.peak_bytes` (baseline included on CPU;
    on CUDA the allocator's peak already includes everything resident)."""

    def __init__(self, device: torch.device, baseline: int = 0):
        self.device = torch.device(device)
        self.baseline = baseline
        self.peak_bytes = 0
        self.method = "cuda.max_memory_allocated" if self.device.type == "cuda" else "tensor allocation tracking"
        self._cpu: CpuPeakMemory | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._cpu = CpuPeakMemory().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._cpu.__exit__(*exc)
            self.peak_bytes = self.baseline + self._cpu.peak
