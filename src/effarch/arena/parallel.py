"""Run an arena's cells in several processes: one job per architecture, spread over the GPUs.

An architecture's quality cells stay in one process, because its unswept tasks reuse the learning rate
its sweep found. Jobs are spread over the GPUs; more jobs than GPUs is allowed but buys little, since
processes sharing a GPU take turns on it (measured on an H200: 12 small-model jobs on one GPU each ran
about 12x slower than alone). Speed cells run at most one job per GPU, so no two timings share a device. Each job is `python -m effarch.arena.worker` with its own results.json under `<out>/.workers/`,
seeded with the cells already finished, and merged back into the run's results.json when it ends; a job
that dies leaves its finished cells behind and its log beside them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from effarch.utils import atomic_write_text

POLL_S = 1.0


@dataclass
class Job:
    label: str  # the architecture's label
    spec: str  # its --arch value
    folder: Path
    slot: int = -1
    gpu: int | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log: Any = None


def visible_device(index: int, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a worker the parent's GPU `index` alone: the parent's own
    CUDA_VISIBLE_DEVICES list (ids or UUIDs) maps its indices, so a run limited to GPUs 2,3 uses those two."""
    if visible is None or not visible.strip():
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return ids[index] if 0 <= index < len(ids) else str(index)


def job_folder(out: Path, phase: str, label: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
    return out / ".workers" / f"{phase}-{safe}"


def worker_command(job: Job, phase: str, device: str, data: str | None, stop_after_s: float | None) -> list[str]:
    cmd = [sys.executable, "-m", "effarch.arena.worker", "--suite-file", str(job.folder / "suite.json")]
    cmd += ["--arch", job.spec, "--out", str(job.folder), "--only", phase, "--device", device]
    if data is not None:
        cmd += ["--data", data]
    if stop_after_s is not None:
        cmd += ["--stop-after", f"{max(0.0, stop_after_s):.1f}"]
    return cmd


def read_cells(folder: Path) -> dict[str, dict]:
    """The cells a worker has written so far (an unreadable file mid-replace reads as none yet)."""
    try:
        return json.loads((folder / "results.json").read_text(encoding="utf-8")).get("cells", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def run_jobs(
    arena,
    phase: str,
    slots: int,
    gpus: list[int] | None,
    *,
    deadline_s: float | None,
    progress: bool,
    only: set[str] | None = None,
) -> list[str]:
    """Run `phase` ("quality" or "speed") for the architectures of `arena` (those labelled in `only`, or all)
    with up to `slots` jobs at a time (job i on GPU gpus[i % len(gpus)]); merge their cells into arena.store.
    Returns notes on jobs that failed."""
    suite_json = json.dumps(arena.suite.to_dict(), default=str)
    archs = arena.quality_order() if phase == "quality" else arena.archs
    archs = [a for a in archs if only is None or a.label in only]
    queue = [Job(a.label, a.spec, job_folder(arena.out, phase, a.label)) for a in archs]
    running: list[Job] = []
    notes: list[str] = []
    free = list(range(slots))
    total = len(queue)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"arena {arena.suite.name} {phase}", unit="arch", dynamic_ncols=True)
    t0 = time.monotonic()
    try:
        while queue or running:
            late = deadline_s is not None and time.monotonic() - t0 > deadline_s
            while queue and free and not late:
                job = queue.pop(0)
                job.slot = free.pop(0)
                job.gpu = None if not gpus else gpus[job.slot % len(gpus)]
                _start(
                    arena, job, phase, suite_json, None if deadline_s is None else deadline_s - (time.monotonic() - t0)
                )
                running.append(job)
            if late and not running:
                break
            time.sleep(POLL_S)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                free.append(job.slot)
                code = job.proc.returncode
                job.log.close()
                merged = _merge(arena, job)
                if code != 0:
                    notes.append(
                        f"the {phase} job of {job.label} exited with status {code} after {merged} cells; "
                        f"its log is {job.folder / 'log.txt'}"
                    )
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                done = sum(len(read_cells(j.folder)) for j in running)
                bar.set_postfix_str(f"running: {', '.join(j.label for j in running)} ({done} cells)", refresh=True)
    except BaseException:
        for job in running:
            job.proc.terminate()
        for job in running:
            try:
                job.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            _merge(arena, job)
        raise
    finally:
        if bar is not None:
            bar.close()
    return notes


def _start(arena, job: Job, phase: str, suite_json: str, stop_after_s: float | None) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.folder / "suite.json", suite_json + "\n")
    # Seed the job's store with this architecture's finished cells, so the job resumes instead of redoing them.
    seed = {cid: c for cid, c in arena.store.cells.items() if c.get("arch") == job.label}
    if not arena.opts.fresh:
        seed.update(read_cells(job.folder))
    atomic_write_text(job.folder / "results.json", json.dumps({"format": 1, "cells": seed}, default=str) + "\n")
    env = dict(os.environ)
    device = arena.device.type
    if job.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_device(job.gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
        device = "cuda"
    env.setdefault("PYTHONUNBUFFERED", "1")
    job.log = open(job.folder / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 - closed when the job ends
    cmd = worker_command(job, phase, device, arena.opts.data, stop_after_s)
    job.proc = subprocess.Popen(cmd, stdout=job.log, stderr=subprocess.STDOUT, env=env)
    job.started = time.monotonic()


def _merge(arena, job: Job) -> int:
    """Copy the job's cells of its architecture into the run's store; returns how many it holds."""
    cells = {cid: c for cid, c in read_cells(job.folder).items() if c.get("arch") == job.label}
    for cid, c in cells.items():
        arena.store.cells[cid] = c
    arena.store.flush()
    return len(cells)
