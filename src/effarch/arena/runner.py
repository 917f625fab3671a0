"""The arena's driver: plan the cells, skip those already in results.json, run the rest with a progress bar,
then write the report.

Order: cache cells (instant), speed cells (short), then quality cells, architecture by architecture, the
learning-rate sweep first so the other tasks can reuse its best rate. With a time budget, every quality
cell gets an equal share of the quality budget and each architecture an equal share of the speed budget;
a wall-clock limit per cell stops the pathological ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from effarch.arena import quality, speed
from effarch.arena.archs import Arch, resolve_archs, task_config
from effarch.arena.deadline import CellTimeout, deadline
from effarch.arena.store import ResultStore, code_stamp, fingerprint, machine_info, versions
from effarch.arena.suites import Suite, TaskSpec, get_suite
from effarch.utils import atomic_write_text


@dataclass
class ArenaOptions:
    suite: str | Suite = "quick"
    archs: list[str] | None = None  # --arch values; None = the default line-up
    data: str | None = None  # --data for the LM task; None = the default corpus
    out: str | None = None  # report folder; None = arena-<suite>
    fresh: bool = False
    device: str = "auto"  # "auto" = the suite's device
    time_budget_s: float | None = None  # overrides the suite's budget
    tasks: list[str] | None = None  # task names or kinds to run; None = all
    only: str | None = None  # "quality" or "speed"
    stop_after_s: float | None = None  # start no new cell after this many seconds
    progress: bool = True
    # Processes for the quality cells (one architecture per process); None = auto: one per GPU (processes
    # sharing a GPU take turns on it rather than overlapping), 1 on a CPU. Speed cells use one per GPU.
    workers: int | None = None
    # Rewrite report.md and the plots from the stored results.json without running any cell (no device needed:
    # a GPU run's results can be reported on a CPU machine).
    report_only: bool = False
    # Cells to measure again although stored: kinds ("quality", "speed" = cache/train/infer, or one of those)
    # and/or architecture labels; a cell is redone when it matches a kind given (if any) and an architecture
    # given (if any). They are deleted from results.json (and the jobs' stores) before the run.
    redo: list[str] | None = None


@dataclass
class ArenaRun:
    out: Path
    complete: bool
    cells_run: int = 0
    cells_skipped: int = 0
    cells_failed: int = 0
    ran: list[str] = field(default_factory=list)


@dataclass
class Cell:
    id: str
    kind: str  # "cache", "train", "infer", "quality"
    arch: Arch
    estimate_s: float
    fp: Callable[[], str]  # fingerprint, computed when the cell is reached (the LR may depend on the sweep)
    run: Callable[[float | None], dict]  # time cap -> record
    length: int | None = None
    task: TaskSpec | None = None
    lr: float | None = None


def _resolve_suite(opts: ArenaOptions) -> tuple[Suite, torch.device]:
    suite = opts.suite if isinstance(opts.suite, Suite) else get_suite(opts.suite)
    if opts.time_budget_s is not None:
        if not opts.time_budget_s > 0:
            raise ValueError(f"--time-budget {opts.time_budget_s} is invalid: it must be a positive number of seconds")
        suite = replace(suite, time_budget_s=float(opts.time_budget_s))
    name = suite.device if opts.device == "auto" else opts.device
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device {opts.device!r} is not one of auto, cpu, cuda")
    if opts.redo is not None and (opts.report_only or opts.fresh):
        raise ValueError("--redo re-measures some stored cells; it cannot be combined with --report-only or --fresh")
    if opts.report_only and opts.fresh:
        raise ValueError("--report-only reports the stored results; --fresh would discard them (pass one of the two)")
    if name.startswith("cuda") and not torch.cuda.is_available() and opts.report_only:
        name = "cpu"  # nothing runs: the device only names the fingerprints' machine
    if name.startswith("cuda") and not torch.cuda.is_available():
        if opts.device != "auto":
            raise ValueError(f"--device {opts.device} asks for a CUDA GPU and this machine has none; use --device cpu")
        raise ValueError(
            f"--suite {suite.name} runs on a CUDA GPU and this machine has none; use --suite quick (or --device cpu)"
        )
    if opts.workers is not None and (not isinstance(opts.workers, int) or opts.workers < 1):
        raise ValueError(f"--workers {opts.workers!r} is invalid: it must be a positive integer")
    if opts.only not in (None, "quality", "speed"):
        raise ValueError(f"--only {opts.only!r} is not one of quality, speed")
    if opts.tasks:
        known = {t.name for t in suite.tasks} | {t.kind for t in suite.tasks}
        bad = [t for t in opts.tasks if t not in known]
        if bad:
            raise ValueError(
                f"--tasks {bad[0]!r} is not a task of suite {suite.name}; its tasks are: {', '.join(sorted(known))}"
            )
        suite = replace(suite, tasks=tuple(t for t in suite.tasks if t.name in opts.tasks or t.kind in opts.tasks))
    return suite, torch.device(name)


def _machine_key(device: torch.device) -> str:
    info = machine_info()
    return info.get("gpu", "") if device.type == "cuda" else f"{info['processor']}x{info['torch_threads']}"


class Arena:
    def __init__(self, opts: ArenaOptions):
        self.opts = opts
        self.suite, self.device = _resolve_suite(opts)
        self.archs, self.notes = resolve_archs(opts.archs, self.suite.quality_size, self.suite.speed_size)
        self.out = Path(opts.out or f"arena-{self.suite.name}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {str(self.out)!r} exists and is not a folder")
        self.corpus = None
        if opts.report_only:
            if not (self.out / "results.json").exists():
                raise ValueError(
                    f"--report-only: {str(self.out / 'results.json')!r} does not exist; run the arena first"
                )
        elif opts.only != "speed" and (opts.data is not None or any(t.kind == "lm" for t in self.suite.tasks)):
            self.corpus = self._load_corpus()
        self.store = ResultStore(self.out, fresh=opts.fresh)
        self._data: dict[str, dict] = {}
        self._machine = _machine_key(self.device)

    # ---- inputs ---------------------------------------------------------------------------------
    def _load_corpus(self):
        from effarch.data.corpus import load_corpus

        corpus = load_corpus(self.opts.data, max_bytes=self.suite.lm_max_bytes)
        need = max((t.train_len for t in self.suite.tasks if t.kind == "lm"), default=0) + 2
        for split in ("train", "val"):
            n = getattr(corpus, split).numel()
            if n < need:
                raise ValueError(
                    f"--data {corpus.source!r} gives only {n} {split} tokens; the LM task needs at least {need} "
                    "(give more text)"
                )
        return corpus

    def task_data(self, task: TaskSpec) -> dict:
        """Batch sources and test sets of a task, built once per run."""
        if task.name in self._data:
            return self._data[task.name]
        from effarch.data.batches import StreamBatches, TaskBatches

        if task.kind == "lm":
            d = {
                "train": StreamBatches(self.corpus.train, task.train_len),
                "val": StreamBatches(self.corpus.val, task.train_len),
            }
        else:
            d = {"train": TaskBatches(*quality.make_task_data(task, task.train_len, "train", self.suite.seed))}
            for n in task.lengths:
                d[("test", n)] = quality.make_task_data(task, n, "test", self.suite.seed)
        self._data[task.name] = d
        return d

    # ---- planning -------------------------------------------------------------------------------
    def best_lr(self, arch: Arch) -> float:
        """The rate with the best mean accuracy over the swept tasks, or the suite default."""
        sweep = [t for t in self.suite.tasks if t.sweep]
        scores: dict[float, list[float]] = {}
        for t in sweep:
            for lr in self.suite.lrs:
                c = self.store.cells.get(self.quality_id(arch, t, lr))
                if c and c.get("status") in ("ok", "diverged"):
                    scores.setdefault(lr, []).append(float(c.get("accuracy", 0.0)))
        full = {lr: sum(v) / len(v) for lr, v in scores.items() if len(v) == len(sweep)}
        if not full:
            return self.suite.default_lr
        return max(full, key=lambda lr: (full[lr], -lr))

    def quality_order(self) -> list[Arch]:
        """Architectures in the order their quality cells run: those the literature check compares first
        (attention, delta rule, fixed decay), so a run stopped early can already say whether MQAR orders as
        published."""
        from effarch.arena.literature import classify

        return sorted(self.archs, key=lambda a: classify(a.quality_config) is None)

    @staticmethod
    def quality_id(arch: Arch, task: TaskSpec, lr: float) -> str:
        return f"quality/{arch.label}/{task.name}/lr={lr:g}"

    def plan(self, everything: bool = False) -> list[Cell]:
        """The cells of this run (`--only` applied), or with `everything` the suite's whole grid (the report
        covers every stored figure of it, whichever phase this run measures)."""
        only = None if everything else self.opts.only
        s = self.suite
        cells: list[Cell] = []
        if only != "quality":
            for a in self.archs:
                cfg = a.speed_config.to_dict()
                cells.append(Cell(
                    f"cache/{a.label}", "cache", a, 0.05,
                    lambda cfg=cfg: fingerprint({"config": cfg, "lengths": s.cache_lens}),
                    lambda cap, a=a: speed.cache_cell(a.speed_config, s.cache_lens),
                ))  # fmt: skip
            for a in self.archs:
                # Lengths interleaved, so a budget that runs out cuts the longest of both kinds.
                for n in sorted(set(s.train_lens) | set(s.infer_lens)):
                    if n in s.train_lens:
                        cells.append(self._speed_cell(a, "train", n))
                    if n in s.infer_lens:
                        cells.append(self._speed_cell(a, "infer", n))
        if only != "speed":
            for a in self.quality_order():
                for t in [t for t in s.tasks if t.sweep] + [t for t in s.tasks if not t.sweep]:
                    for lr in s.lrs if t.sweep else (None,):
                        cells.append(self._quality_cell(a, t, lr))
        return cells

    def _speed_cell(self, a: Arch, kind: str, n: int) -> Cell:
        s, dev = self.suite, self.device
        cfg = a.speed_config.to_dict()
        what = {"tokens": s.train_tokens} if kind == "train" else {"decode": s.decode_tokens}

        def fp() -> str:
            return fingerprint({"config": cfg, "length": n, **what, "repeats": s.repeats, "machine": self._machine})

        def run(cap: float | None) -> dict:
            cap = s.speed_time_cap_s if cap is None else cap
            if kind == "train":
                return speed.train_step_cell(
                    a.speed_config, n, tokens=s.train_tokens, repeats=s.repeats, time_cap_s=cap, device=dev, seed=s.seed
                )
            return speed.inference_cell(
                a.speed_config,
                n,
                decode_tokens=s.decode_tokens,
                repeats=s.repeats,
                time_cap_s=cap,
                device=dev,
                seed=s.seed,
            )

        return Cell(f"{kind}/{a.label}/T={n}", kind, a, 2.0 if dev.type == "cpu" else 5.0, fp, run, length=n)

    def _quality_cell(self, a: Arch, t: TaskSpec, lr: float | None) -> Cell:
        s, dev = self.suite, self.device
        est = 60.0 if s.time_budget_s is None else 10.0
        cell = Cell("", "quality", a, est, None, None, task=t, lr=lr)

        def current_lr() -> float:
            return lr if lr is not None else self.best_lr(a)

        def fp() -> str:
            cell.lr = current_lr()
            cell.id = self.quality_id(a, t, cell.lr)
            cfg = task_config(a.quality_config, t.vocab_size, max(t.lengths)).to_dict()
            source = None if t.kind != "lm" else (self.corpus.source, int(self.corpus.train.numel()))
            return fingerprint(
                {
                    "config": cfg,
                    "task": asdict(t),
                    "lr": cell.lr,
                    "device": dev.type,
                    "seed": s.seed,
                    "budgeted": s.time_budget_s is not None,
                    "data": source,
                }
            )

        def run(cap: float | None) -> dict:
            return quality.quality_cell(a, t, cell.lr, s, dev, time_cap_s=cap, data=self.task_data(t))

        cell.fp, cell.run = fp, run
        cell.id = self.quality_id(a, t, current_lr())
        return cell

    # ---- running --------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "suite": self.suite.to_dict(),
            "device": str(self.device),
            "machine": machine_info(),
            "versions": versions(),
            "seeds": {
                "model_init": self.suite.seed,
                "data": self.suite.seed,
                "task_seed_rule": "crc32('seed:kind:name:length:split')",
            },
            "archs": {
                a.label: {
                    "spec": a.spec,
                    "family": a.family,
                    "paper": a.paper,
                    "quality_config": a.quality_config.to_dict(),
                    "speed_config": a.speed_config.to_dict(),
                }
                for a in self.archs
            },
            "data": None
            if self.corpus is None
            else {
                "source": self.corpus.source,
                "n_docs": self.corpus.n_docs,
                "train_tokens": int(self.corpus.train.numel()),
                "val_tokens": int(self.corpus.val.numel()),
            },
            "notes": self.notes,
        }

    def gpus(self) -> list[int] | None:
        """The GPUs jobs are spread over (None on a CPU)."""
        if self.device.type != "cuda":
            return None
        if self.device.index is not None:
            return [self.device.index]
        return list(range(torch.cuda.device_count()))

    def quality_workers(self) -> int:
        if self.opts.workers is not None:
            return self.opts.workers
        gpus = self.gpus()
        return len(gpus) if gpus else 1

    def _run_parallel(self, t_start: float) -> tuple[list[str], set[str]]:
        """Run the pending cells in worker processes (speed first, then quality). Returns notes and the ids of
        the cells the jobs attempted, which the serial pass then leaves alone (a failure is not retried in
        the same run)."""
        from effarch.arena.parallel import job_folder, read_cells, run_jobs

        gpus = self.gpus()
        phases = [p for p in ("speed", "quality") if self.opts.only in (None, p)]
        if not self.opts.fresh:  # cells a job finished after an earlier run was stopped before merging them
            for phase in phases:
                for a in self.archs:
                    for cid, c in read_cells(job_folder(self.out, phase, a.label)).items():
                        if c.get("arch") == a.label and cid not in self.store.cells:
                            self.store.cells[cid] = c
            self.store.flush()
        before = {cid: dict(c) for cid, c in self.store.cells.items()}
        notes: list[str] = []
        for phase in phases:
            # Timings are only taken one job per GPU; on a CPU they stay in this process, one at a time.
            slots = len(gpus or []) if phase == "speed" else self.quality_workers()
            if slots <= 1:
                continue
            left = None
            if self.opts.stop_after_s is not None:
                left = self.opts.stop_after_s - (time.monotonic() - t_start)
                if left <= 0:
                    break
            kinds = ("quality",) if phase == "quality" else ("cache", "train", "infer")
            todo = {c.arch.label for c in self.plan() if c.kind in kinds and not self.store.done(c.id, c.fp())}
            if todo:
                notes += run_jobs(
                    self, phase, min(slots, len(todo)), gpus, deadline_s=left, progress=self.opts.progress, only=todo
                )
        attempted = {cid for cid, c in self.store.cells.items() if before.get(cid) != c}
        return notes, attempted

    def run(self, *, write_report: bool = True) -> ArenaRun:
        from effarch.arena.report import write_report as write

        if self.opts.redo:
            self._forget(self._redo_matcher(self.opts.redo))
        if self.opts.report_only:  # the stored figures and their machine as they are; nothing runs
            planned = [c.id for c in self.plan(everything=True)]
            write(self.out, self.store.data, self.suite, self.archs, planned)
            stored = sum(cid in self.store.cells for cid in planned)
            return ArenaRun(self.out, complete=stored == len(planned), cells_skipped=stored)
        t_start = time.monotonic()
        self.store.set_meta(**self.metadata())
        self.store.flush()
        cells = self.plan()
        result = ArenaRun(self.out, complete=True)
        pending = [c for c in cells if not self.store.done(c.id, c.fp())]
        result.cells_skipped = len(cells) - len(pending)
        attempted: set[str] = set()
        if pending and (self.quality_workers() > 1 or len(self.gpus() or []) > 1):
            notes, attempted = self._run_parallel(t_start)
            if notes:
                self.store.set_meta(notes=self.notes + notes)
            result.cells_run += len(attempted)
            result.ran += sorted(attempted)
            result.cells_failed += sum(self.store.cells[c].get("status") == "error" for c in attempted)
            pending = [c for c in pending if c.id not in attempted and not self.store.done(c.id, c.fp())]
        n_quality = sum(c.kind == "quality" and not c.task.fixed_steps for c in pending)
        stopped_speed: dict[tuple[str, str], str] = {}  # (kind, arch) whose length sweep ended -> why
        speed_spent: dict[str, float] = {}  # arch -> seconds spent on its speed cells in this run
        if self.suite.time_budget_s is not None:  # the budget itself is the best estimate of the time left
            for kind, share in (("quality", self.suite.quality_share), ("speed", 1 - self.suite.quality_share)):
                group = [c for c in pending if (c.kind == "quality") == (kind == "quality") and c.kind != "cache"]
                for c in group:
                    c.estimate_s = share * self.suite.time_budget_s / len(group)
        bar = self._bar(sum(c.estimate_s for c in pending))
        try:
            for c in cells:
                fp = c.fp()
                if c.id in attempted:
                    continue
                if self.store.done(c.id, fp):
                    if c.kind in ("train", "infer") and self.store.cells[c.id]["status"] in ("oom", "too_slow"):
                        stopped_speed[(c.kind, c.arch.label)] = "a shorter length was too slow or out of memory"
                    continue
                if self.opts.stop_after_s is not None and time.monotonic() - t_start > self.opts.stop_after_s:
                    result.complete = False
                    break
                if bar is not None:
                    bar.set_postfix_str(c.id, refresh=True)
                cap = None
                if c.kind == "quality" and not c.task.fixed_steps:
                    cap = self._quality_cap(n_quality)
                elif c.kind in ("train", "infer"):
                    cap = self._speed_cap(speed_spent.get(c.arch.label, 0.0))
                    if cap is not None and cap <= 0:
                        stopped_speed.setdefault((c.kind, c.arch.label), "the architecture's speed budget was used up")
                t0 = time.perf_counter()
                if (c.kind, c.arch.label) in stopped_speed:
                    why = stopped_speed[(c.kind, c.arch.label)]
                    # Over budget is retried by the next run; too slow or out of memory is final.
                    status = "too_slow" if "too slow" in why else "skipped"
                    record = {"status": status, "length": c.length, "note": f"not run: {why}"}
                else:
                    record = self._run_cell(c, cap)
                record["wall_s"] = time.perf_counter() - t0
                if c.kind in ("train", "infer"):
                    speed_spent[c.arch.label] = speed_spent.get(c.arch.label, 0.0) + record["wall_s"]
                if cap is not None:
                    record["time_cap_s"] = cap
                if c.kind in ("train", "infer") and record.get("status") in ("oom", "too_slow"):
                    stopped_speed.setdefault((c.kind, c.arch.label), "a shorter length was too slow or out of memory")
                if c.kind in ("train", "infer") and record.get("status") == "error":
                    # Retried by the next run, like the failed cell itself.
                    stopped_speed.setdefault((c.kind, c.arch.label), "a shorter length failed (retried next run)")
                where = {"task": c.task.name, "lr": c.lr} if c.kind == "quality" else {"length": c.length}
                self.store.put(
                    c.id, fp, {"kind": c.kind, "arch": c.arch.label, **where, **record, "code": code_stamp()}
                )
                result.cells_run += 1
                result.ran.append(c.id)
                result.cells_failed += record.get("status") == "error"
                if bar is not None:
                    bar.update(c.estimate_s)
        finally:
            if bar is not None:
                bar.close()
            self.store.set_meta(
                run={
                    "planned_cells": [c.id for c in cells],
                    "archs": [a.label for a in self.archs],
                    "complete": result.complete,
                    "elapsed_s": time.monotonic() - t_start,
                }
            )
            self.store.flush()
        if write_report:
            write(self.out, self.store.data, self.suite, self.archs, [c.id for c in self.plan(everything=True)])
        return result

    def _redo_matcher(self, redo: list[str]) -> Callable[[dict], bool]:
        kinds_of = {"quality": {"quality"}, "speed": {"cache", "train", "infer"}}
        kinds_of.update({k: {k} for k in ("cache", "train", "infer")})
        labels = {a.label for a in self.archs}
        kinds: set[str] = set()
        archs: set[str] = set()
        for item in redo:
            if item in kinds_of:
                kinds |= kinds_of[item]
            elif item in labels:
                archs.add(item)
            else:
                raise ValueError(
                    f"--redo {item!r} is neither a cell kind ({', '.join(kinds_of)}) nor an architecture of this "
                    f"run ({', '.join(sorted(labels))})"
                )
        return lambda c: (not kinds or c.get("kind") in kinds) and (not archs or c.get("arch") in archs)

    def _forget(self, matches: Callable[[dict], bool]) -> None:
        """Delete the matching cells from results.json and from every job's store (which seeds resumed jobs)."""
        from effarch.arena.parallel import read_cells

        for cid in [cid for cid, c in self.store.cells.items() if matches(c)]:
            del self.store.cells[cid]
        self.store.flush()
        for folder in sorted((self.out / ".workers").glob("*")) if (self.out / ".workers").is_dir() else []:
            cells = read_cells(folder)
            kept = {cid: c for cid, c in cells.items() if not matches(c)}
            if len(kept) != len(cells):
                atomic_write_text(folder / "results.json", json.dumps({"format": 1, "cells": kept}, default=str) + "\n")

    def _quality_cap(self, n_quality: int) -> float | None:
        """Every quality cell of a budgeted run gets the same share, so the architectures run last are not
        starved when earlier cells overrun."""
        s = self.suite
        if s.time_budget_s is None:
            return None
        return float(min(s.cell_time_cap_s, max(1.0, s.quality_share * s.time_budget_s / max(1, n_quality))))

    def _speed_cap(self, spent: float) -> float | None:
        """Longest single step a speed cell may take: the suite's cap, within the architecture's share of
        the speed budget ((1 - quality_share) of the total, split evenly) when there is a budget."""
        s = self.suite
        if s.time_budget_s is None:
            return None
        share = (1 - s.quality_share) * s.time_budget_s / len(self.archs)
        left = share - spent
        return 0.0 if left <= 0 else float(min(s.speed_time_cap_s, max(0.5, left / (s.repeats + 2))))

    def _run_cell(self, c: Cell, cap: float | None) -> dict:
        s = self.suite
        if c.kind == "quality":  # training and scoring stop themselves; this catches the pathological
            limit = 2 * (cap or s.cell_time_cap_s) + 10
        elif c.kind in ("train", "infer"):
            limit = (cap or s.speed_time_cap_s) * (s.repeats + 4) + 5
        else:
            limit = None
        try:
            with deadline(limit):
                return c.run(cap)
        except CellTimeout as e:
            return {"status": "too_slow", "note": str(e)}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one failing architecture must not stop the others; the report shows it
            msg = f"{type(e).__name__}: {e}"
            if self.opts.progress:
                from tqdm.auto import tqdm

                tqdm.write(f"arena: cell {c.id} failed: {msg}")
            return {"status": "error", "note": msg[:500]}

    def _bar(self, total_s: float):
        if not self.opts.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=max(total_s, 1e-3),
            desc=f"arena {self.suite.name}",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left{postfix}",
            dynamic_ncols=True,
        )


def run_arena(opts: ArenaOptions) -> ArenaRun:
    """Run (or resume) an arena and write report.md, the plots and results.json into the out folder."""
    return Arena(opts).run()
