"""Shared by the benchmark scripts: the environment line and dated appends to benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def environment() -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    for mod in ("fla", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional peers
            env[mod] = None
    return env


def append_section(title: str, body: str) -> None:
    """Append `## date - title`, the environment and `body` to RESULTS.md (written atomically)."""
    from effarch.utils import atomic_write_text

    env = environment()
    device = env.get("gpu") or env.get("cpu")
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "gpu", "cpu") and v)
    old = RESULTS.read_text() if RESULTS.exists() else "# effarch benchmark results\n"
    atomic_write_text(RESULTS, old.rstrip("\n") + f"\n\n## {env['date']} - {title}\n\n{device}; {versions}\n\n{body}\n")
