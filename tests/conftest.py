"""Shared test helpers: seeded randomness, tolerances by dtype, and tiny mixer instances."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, tol: float | None = None):
    tol = tol if tol is not None else TOL[dtype or out.dtype]
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3e} >= {tol:.1e}"


def spy_launches(monkeypatch, module, name: str, record, grid: bool = False, keywords: bool = False) -> None:
    """Replace module.name (a Triton kernel) by one that calls record(args), or record(its grid) with `grid`, or
    record(its keyword arguments: the constexprs and launch options) with `keywords`, at each launch, then
    launches."""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, launch_grid):
            def launch_and_record(*args, **kwargs):
                record(launch_grid if grid else kwargs if keywords else args)
                return kernel[launch_grid](*args, **kwargs)

            return launch_and_record

    monkeypatch.setattr(module, name, Spy())
