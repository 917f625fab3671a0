"""The Triton kernels' torch.library custom ops, called directly in eager mode.

Every kernel module writes its forward and backward as plain functions and registers each as a custom op with a
fake (shape-only) implementation, so torch.compile traces a kernel as one opaque node. In eager mode a custom op
call passes through the dispatcher's Python layers first (default filling, redispatch, the generated autograd
Function): on a 2-core CPU an RMSNorm forward + backward cost 140-150 us that way against 80-90 through a plain
autograd.Function, and a 24-layer Gated DeltaNet training step makes about 530 such calls, forward and backward.
`KernelCall` and `DifferentiableKernelCall` take the plain function in eager mode and the custom op while
torch.compile traces; both run the same code, set up and differentiated the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class KernelCall:
    """A kernel function `impl` called directly in eager mode and through its custom op `op` (registered as
    `name`) under torch.compile: the backward passes' kernels, which autograd runs without recording."""

    def __init__(self, name: str, op: Any, impl: Callable):
        self.name, self.op, self.impl = name, op, impl

    def __call__(self, *args):
        return self.op(*args) if torch.compiler.is_compiling() else self.impl(*args)


class DifferentiableKernelCall(KernelCall):
    """A forward kernel with its gradient: `op.register_autograd(backward, setup_context=setup)` for torch.compile,
    and in eager mode an autograd.Function whose forward runs `impl` then `setup` and whose backward is `backward`
    (without any input needing a gradient, `impl` alone). Arguments are positional."""

    def __init__(self, name: str, op: Any, impl: Callable, setup: Callable, backward: Callable):
        super().__init__(name, op, impl)
        op.register_autograd(backward, setup_context=setup)

        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        self.function = type(
            "Eager_" + name.split("::")[-1],
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return self.impl(*args)
