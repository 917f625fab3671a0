"""The Triton kernels' torch.library custom ops, called directly in eager mode.

Every kernel module writes its forward and backward as plain functions and registers each as a custom op with a
fake (shape-only) implementation, so torch.compile traces a kernel as one opaque node. In eager mode a custom op
call passes through the dispatcher's Python layers first (default filling, redispatch, the generated autograd
Function): on a 2-core CPU an RMSNorm forward + backward cost 140-150 us that way against 80-90 through a plain
autograd.Function, and a 24-layer Gated DeltaNet training step makes about 530 such calls, forward and backward.
`KernelCall` takes the plain function in eager mode and the custom op while
torch.compile traces; both run the same code, set up and differentiated the same way.

"While torch.compile traces" is `tracing()`: Dynamo's trace, and also AOT autograd's trace of the backward, which
runs the registered backward over fake tensors outside Dynamo (`torch.compiler.is_compiling()` is False there, and
a kernel launched on a fake tensor fails: it has no data pointer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


def tracing() -> bool:
    """True while torch.compile traces (Dynamo, or AOT autograd under its fake and functional tensor modes) or
    any other dispatch mode is active: code then goes through custom ops and keeps no tensor it makes."""
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


class KernelCall:
    """A kernel function `impl` registered as the custom op `name` (`.op`, for fake implementations and checks),
    called directly in eager mode and through the op while torch.compile traces. `differentiable(setup,
    backward)` gives it a gradient on both paths."""

    def __init__(self, name: str, impl: Callable, mutates_args: tuple[str, ...] = ()):
        self.name, self.impl = name, impl
        self.op: Any = torch.library.custom_op(name, impl, mutates_args=mutates_args)
        self.function: type[torch.autograd.Function] | None = None

    def differentiable(self, setup: Callable, backward: Callable) -> None:
        """`op.register_autograd(backward, setup_context=setup)` for torch.compile, and for eager mode an
        autograd.Function whose forward runs `impl` then `setup` and whose backward is `backward`."""
        self.op.register_autograd(backward, setup_context=setup)
        impl = self.impl

        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        self.function = type(
            "Eager_" + self.name.split("::")[-1],
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        """Arguments positional. Without an input needing a gradient (or any gradient), `impl` alone."""
        if tracing():
            return self.op(*args)
        if (
            self.function is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            return self.function.apply(*args)
        return self.impl(*args)
