"""results.json: every raw figure of an arena run, rewritten atomically after each cell so a re-run resumes.

A cell is finished when results.json holds it with the same fingerprint (a hash of everything that
defines it: the model config, the task, the learning rate, the device, the seed). Budgets are not part of
the fingerprint, so adding an architecture does not redo the others' cells.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from effarch.utils import atomic_write_text

FORMAT = 1
# Cells in these states are not redone on resume; "error" cells are (the cause may be fixed by then).
FINISHED = ("ok", "diverged", "oom", "too_slow")


def fingerprint(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ResultStore:
    """The `cells` table of results.json plus run metadata, kept in memory and flushed atomically."""

    def __init__(self, folder: str | os.PathLike, *, fresh: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / "results.json"
        self.data: dict[str, Any] = {"format": FORMAT, "cells": {}}
        if self.path.exists() and not fresh:
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(
                    f"{str(self.path)!r} is not a readable results file; delete it or pass --fresh"
                ) from None
            if (
                not isinstance(loaded, dict)
                or loaded.get("format") != FORMAT
                or not isinstance(loaded.get("cells"), dict)
            ):
                raise ValueError(f"{str(self.path)!r} was written by another arena version; pass --fresh to start over")
            self.data = loaded

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.data["cells"]

    def done(self, cell_id: str, fp: str) -> bool:
        c = self.cells.get(cell_id)
        return c is not None and c.get("fingerprint") == fp and c.get("status") in FINISHED

    def put(self, cell_id: str, fp: str, record: dict[str, Any]) -> None:
        self.cells[cell_id] = {"fingerprint": fp, **record}
        self.flush()

    def set_meta(self, **meta: Any) -> None:
        self.data.update(meta)

    def flush(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = json.dumps(_finite(self.data), indent=1, sort_keys=True, default=str, allow_nan=False)
        atomic_write_text(self.path, text + "\n")


def _finite(obj: Any) -> Any:
    """NaN and infinities become null, so results.json is strict JSON that any reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_count=torch.cuda.device_count())
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    import numpy
    import torch

    import effarch

    out: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "effarch": effarch.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }
    for mod in ("triton", "fla"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken on this machine: recorded as absent
            out[mod] = None
    return out


@functools.cache
def code_stamp() -> str:
    """A short hash of effarch's own source files: each cell records the code that measured it, so a report
    can say when its figures come from different versions (a cell is not redone just because the code moved)."""
    import effarch

    root = Path(effarch.__file__).parent
    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]
