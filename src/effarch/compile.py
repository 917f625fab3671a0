"""torch.compile applied after the model is built (as gpt-fast and torchtitan do): block by block, so one
compiled graph serves every layer of the same kind and a mixer that cannot be traced only breaks its own."""

from __future__ import annotations

import torch


def compile_model(
    model: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = False, fullgraph: bool = False
) -> torch.nn.Module:
    """Compile each block of an effarch model in place and return the model.

    `mode` as for torch.compile ("default", "reduce-overhead", "max-autotune"); `dynamic=False` specialises
    on shapes, which suits training at a fixed length.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("compile_model expects an effarch model with .blocks")
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    return model
