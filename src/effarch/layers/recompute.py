"""Float32 elementwise chains (output gates, gated norms) recomputed in the backward pass instead of kept.

`upcast(o) * silu(upcast(g))` in a bf16 model keeps, for backward, a float32 copy of each operand and of every
intermediate: three to six 4-byte copies of tensors whose inputs are 2 bytes. Recomputing the chain from its
bf16 inputs in backward costs one more elementwise pass and keeps only the inputs (the survey's theme: move and
hold less data). The values and gradients are those of the plain chain, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), with fn's intermediates recomputed in backward when a gradient will be taken.

    `fn` must be deterministic (no random numbers: the generator state is not saved, so the step can be
    captured in a CUDA graph). Parameters it reads by closure receive their gradients as usual.
    """
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)
