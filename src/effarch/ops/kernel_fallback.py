"""Run a Triton kernel with a PyTorch fallback: a kernel that cannot be built for a shape is reported once and
that shape then stays on the PyTorch form, instead of failing the model. Also the lazy import the dispatchers
share, so the Triton modules load on first use (tests turn the interpreter on before any kernel is defined)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Hashable
from types import ModuleType
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


def import_once(owner: ModuleType, module: str, names: tuple[str, ...]) -> tuple | ImportError:
    """`owner._triton`: the named objects of `module` (a tuple), or the ImportError met; imported on the first
    call and kept on the calling module `owner` (where tests can replace it). The owner is passed as its module
    object, not its globals(), which torch.compile cannot trace."""
    if getattr(owner, "_triton", None) is None:
        try:
            mod = importlib.import_module(module)
            owner._triton = tuple(getattr(mod, n) for n in names)
        except ImportError as e:
            owner._triton = e
        except AttributeError as e:
            owner._triton = ImportError(str(e))
    return owner._triton


def kernel_or_reference(
    owner: ModuleType,
    load: Callable[[], tuple | ImportError],
    key: Hashable,
    first: object,
    supports_args: tuple,
    call_args: tuple,
    reference: Callable[[], R],
) -> R:
    """The dispatch of an op whose module `owner` holds `AUTO_TRITON` (the switch), `_on_gpu(tensor)` and `_fallback`
    (a `KernelFallback`), read from it at each call so tests can replace them: the kernel `load()[0](*call_args)`
    when the switch is on, `first` is on the GPU and `load()[1](*supports_args)` accepts the call, else `reference()`
    (also when the kernel cannot be imported or built)."""
    if not (owner.AUTO_TRITON and owner._on_gpu(first)):
        return reference()
    loaded = load()
    if isinstance(loaded, ImportError) or not loaded[1](*supports_args):
        return reference()
    return owner._fallback.run(key, lambda: loaded[0](*call_args), reference)
