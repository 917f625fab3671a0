"""Run a Triton kernel with a PyTorch fallback: a kernel that cannot be built for a shape is reported once and
that shape then stays on the PyTorch form, instead of failing the model. Also the lazy import the dispatchers
share, so the Triton modules load on first use (tests turn the interpreter on before any kernel is defined)."""

from __future__ import annotations

import importlib
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


def import_once(namespace: dict, module: str, names: tuple[str, ...]) -> tuple | ImportError:
    """`namespace["_triton"]`: the named objects of `module` (a tuple), or the ImportError met; imported on the
    first call and kept in the caller's module globals (where tests can replace it)."""
    if namespace.get("_triton") is None:
        try:
            mod = importlib.import_module(module)
            namespace["_triton"] = tuple(getattr(mod, n) for n in names)
        except ImportError as e:
            namespace["_triton"] = e
        except AttributeError as e:
            namespace["_triton"] = ImportError(str(e))
    return namespace["_triton"]


def kernel_or_reference(
    namespace: dict,
    load: Callable[[], tuple | ImportError],
    key: Hashable,
    first: object,
    supports_args: tuple,
    call_args: tuple,
    reference: Callable[[], R],
) -> R:
    """The dispatch of an op whose module holds `AUTO_TRITON` (the switch), `_on_gpu(tensor)` and `_fallback` (a
    `KernelFallback`), read from `namespace` at each call so tests can replace them: the kernel `load()[0](*call_args)`
    when the switch is on, `first` is on the GPU and `load()[1](*supports_args)` accepts the call, else `reference()`
    (also when the kernel cannot be imported or built)."""
    if not (namespace["AUTO_TRITON"] and namespace["_on_gpu"](first)):
        return reference()
    loaded = load()
    if isinstance(loaded, ImportError) or not loaded[1](*supports_args):
        return reference()
    return namespace["_fallback"].run(key, lambda: loaded[0](*call_args), reference)
