"""torch.compile applied after the model is built (as gpt-fast and torchtitan do): block by block, so one
compiled graph serves every layer of the same kind and a mixer that cannot be traced only breaks its own."""

from __future__ import annotations

import torch


def load_kernels() -> None:
    """Import the Triton kernel modules that the ops load on first use (the linear recurrence, short convolution,
    selective scan and TTT loop), so that a trace never meets the import: torch.compile cannot trace it, and with
    fullgraph=True would fail on it. Without Triton each dispatcher keeps the ImportError and its PyTorch form."""
    import importlib

    from effarch.ops import conv, linear, ttt

    scan = importlib.import_module("effarch.ops.scan.selective_scan")  # the package exports a function of that name
    for load in (linear._load_triton, conv._load, scan._load_triton, ttt._load):
        load()


def compile_model(
    model: torch.nn.Module,
    *,
    mode: str | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = False,
    backend: str = "inductor",
) -> torch.nn.Module:
    """Compile each block of an effarch model in place and return the model.

    `mode` as for torch.compile ("default", "reduce-overhead", "max-autotune"); `dynamic=False` specialises
    on shapes, which suits training at a fixed length; `backend` as for torch.compile ("aot_eager" traces without
    generating code, to check that a model traces).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("compile_model expects an effarch model with .blocks")
    load_kernels()
    for block in blocks:
        block.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
    return model
