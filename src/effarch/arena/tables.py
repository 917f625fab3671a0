"""Figures of one arena run, gathered from results.json's cells into per-architecture tables.

Only the cells planned by the run are used, so older cells kept in results.json for resuming other line-ups
do not leak into the report. For quality, the best learning rate of each (architecture, task) is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from effarch.arena.suites import Suite, TaskSpec


@dataclass
class Tables:
    archs: list[str]
    tasks: list[TaskSpec]
    train: dict[str, dict[int, dict]] = field(default_factory=dict)  # arch -> length -> record
    infer: dict[str, dict[int, dict]] = field(default_factory=dict)
    cache: dict[str, dict] = field(default_factory=dict)  # arch -> record
    sweep: dict[str, dict[str, dict[float, dict]]] = field(default_factory=dict)  # arch -> task -> lr -> record
    failures: list[tuple[str, str]] = field(default_factory=list)  # (cell id, note)
    missing: int = 0  # planned cells without a record (a run stopped early)

    def best(self, arch: str, task: TaskSpec) -> dict | None:
        """The record of the best learning rate (highest accuracy; lowest bits per byte for the LM task)."""
        runs = [
            r for r in self.sweep.get(arch, {}).get(task.name, {}).values() if r.get("status") in ("ok", "diverged")
        ]
        if not runs:
            return None
        if task.kind == "lm":
            ok = [r for r in runs if r.get("bpb") is not None]
            return min(ok, key=lambda r: r["bpb"]) if ok else None
        return max(runs, key=lambda r: (r.get("accuracy", 0.0), -r["lr"]))

    def ok_lengths(self, table: dict[str, dict[int, dict]], key: str) -> dict[str, dict[int, float]]:
        """arch -> length -> figure, for cells that finished."""
        return {
            a: {n: r[key] for n, r in sorted(rows.items()) if r.get("status") == "ok" and r.get(key) is not None}
            for a, rows in table.items()
        }

    def mean_accuracy(self, arch: str) -> float | None:
        """Mean accuracy at the training length over the synthetic tasks (None if any is missing)."""
        accs = []
        for t in self.tasks:
            if t.kind == "lm":
                continue
            r = self.best(arch, t)
            if r is None:
                return None
            accs.append(r.get("accuracy", 0.0))
        return sum(accs) / len(accs) if accs else None


def collect(data: dict[str, Any], suite: Suite, archs: list[str], planned: list[str]) -> Tables:
    cells = data.get("cells", {})
    tables = Tables(archs=list(archs), tasks=list(suite.tasks))
    for cid in planned:
        rec = cells.get(cid)
        if rec is None:
            tables.missing += 1
            continue
        kind, arch = rec.get("kind"), rec.get("arch")
        if rec.get("status") == "error":
            tables.failures.append((cid, rec.get("note", "")))
        if kind in ("train", "infer") and rec.get("length") is not None:
            getattr(tables, kind).setdefault(arch, {})[int(rec["length"])] = rec
        elif kind == "cache":
            tables.cache[arch] = rec
        elif kind == "quality":
            tables.sweep.setdefault(arch, {}).setdefault(rec["task"], {})[float(rec["lr"])] = rec
    return tables
