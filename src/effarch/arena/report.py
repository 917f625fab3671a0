"""report.md: the verdict (which architecture wins where), the tables, the literature check and the settings.

Written atomically from results.json alone, so a resumed or stopped run always leaves a consistent report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from effarch.arena import literature
from effarch.arena.plots import pareto_front, pareto_points, write_plots
from effarch.arena.suites import Suite
from effarch.arena.tables import Tables, collect
from effarch.data.tasks import chance_accuracy
from effarch.models.config import ModelConfig
from effarch.utils import atomic_write_text

MIB = 2**20


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _speed_cell(rec: dict | None, key: str, fmt) -> str:
    if rec is None:
        return "–"
    if rec.get("status") != "ok":
        return {"oom": "OOM", "too_slow": "too slow", "error": "error", "skipped": "over budget"}.get(
            rec.get("status"), "–"
        )
    return fmt(rec.get(key))


def _winner(values: dict[str, float], lower_is_better: bool = False) -> tuple[str, float] | None:
    values = {a: v for a, v in values.items() if v is not None}
    if not values:
        return None
    a = (min if lower_is_better else max)(values, key=values.get)
    return a, values[a]


def _versus(values: dict[str, float], winner: str, fmt) -> str:
    """'; transformer: 8.0 GiB' - the baseline's figure beside the winner's, when there is a baseline."""
    base = next((a for a in values if a.split(":")[0] == "transformer" and a != winner), None)
    if base is None or values.get(base) is None:
        return ""
    return f"; {base}: {fmt(values[base])}"


CHANCE_MARGIN = 2.0  # a best accuracy under twice the chance level names no winner


def verdict(t: Tables) -> list[str]:
    out = []
    for task in t.tasks:
        vals = {a: (t.best(a, task) or {}).get("bpb" if task.kind == "lm" else "accuracy") for a in t.archs}
        w = _winner(vals, lower_is_better=task.kind == "lm")
        chance = None if task.kind == "lm" else chance_accuracy(task.kind, task.vocab_size)
        if w and chance is not None and w[1] < CHANCE_MARGIN * chance:
            out.append(
                f"No architecture beat chance on {task.name} (best {w[1]:.3f}, chance {chance:.3f}): "
                "it does not rank them at this budget."
            )
        elif w:
            what = "bits per byte" if task.kind == "lm" else "accuracy"
            out.append(f"Best on {task.name}: **{w[0]}** ({what} {w[1]:.3f}).")
    means = {a: t.mean_accuracy(a) for a in t.archs}
    w = _winner(means)
    if w:
        out.append(f"Best mean accuracy over the synthetic tasks: **{w[0]}** ({w[1]:.3f}).")
    for table, key, what, lower, fmt in (
        (t.train, "tokens_per_s", "Fastest training", False, lambda v: f"{v:,.0f} tokens/s"),
        (t.train, "peak_mem_bytes", "Least training memory", True, _bytes),
        (t.infer, "prefill_s", "Fastest prefill", True, lambda v: f"{v * 1e3:.1f} ms"),
        (t.infer, "decode_s_per_token", "Fastest decoding", True, lambda v: f"{v * 1e3:.2f} ms/token"),
        (t.infer, "decode_graph_s_per_token", "Fastest CUDA-graph decoding", True, lambda v: f"{v * 1e3:.3f} ms/token"),
    ):
        ok = t.ok_lengths(table, key)
        lengths = sorted({n for v in ok.values() for n in v})
        if not lengths:
            continue
        # The longest length that the most architectures finished, so the comparison has contestants.
        n = max(lengths, key=lambda m: (sum(m in v for v in ok.values()), m))
        vals = {a: v.get(n) for a, v in ok.items()}
        w = _winner(vals, lower)
        if w:
            finished = sum(v is not None for v in vals.values())
            out.append(
                f"{what} at {n:,} tokens: **{w[0]}** ({fmt(w[1])}{_versus(vals, w[0], fmt)}; "
                f"{finished} of {len(t.archs)} architectures reached this length)."
            )
    caches = {a: r.get("cache_bytes", {}) for a, r in t.cache.items() if r.get("status") == "ok"}
    if caches:
        n = max(int(k) for v in caches.values() for k in v)
        vals = {a: v.get(str(n)) for a, v in caches.items()}
        w = _winner(vals, lower_is_better=True)
        if w:
            out.append(
                f"Smallest inference cache at {n:,} tokens: **{w[0]}** ({_bytes(w[1])}{_versus(vals, w[0], _bytes)})."
            )
    points, n = pareto_points(t)
    if len(points) > 1:
        out.append(
            f"Pareto front of mean accuracy against training speed at {n:,} tokens: "
            + ", ".join(f"**{a}**" for a in pareto_front(points))
            + "."
        )
    return out or ["No finished cells yet."]


def _arch_section(t: Tables, meta: dict) -> str:
    rows = []
    archs = meta.get("archs", {})
    for a in t.archs:
        info = archs.get(a, {})
        qc = info.get("quality_config", {})
        sc = info.get("speed_config", {})
        cache = t.cache.get(a, {})
        rows.append(
            [
                a,
                info.get("family", ""),
                info.get("paper", "") or "config file",
                f"{qc.get('d_model', '?')} / {qc.get('layers', '?')}",
                f"{sc.get('d_model', '?')} / {sc.get('layers', '?')}",
                _num(cache.get("params")),
            ]
        )
    return _table(
        [
            "architecture",
            "family",
            "paper",
            "quality model: d / layers",
            "speed model: d / layers",
            "speed-model params",
        ],
        rows,
    )


def _quality_section(t: Tables) -> str:
    parts = []
    header = ["architecture"] + [task.name for task in t.tasks] + ["mean accuracy"]
    rows = []
    for a in t.archs:
        row = [a]
        for task in t.tasks:
            r = t.best(a, task)
            if r is None:
                statuses = {x.get("status") for x in t.sweep.get(a, {}).get(task.name, {}).values()}
                row.append(next((w for st, w in (("error", "error"), ("too_slow", "too slow")) if st in statuses), "–"))
                continue
            v = r.get("bpb") if task.kind == "lm" else r.get("accuracy")
            mark = "*" if r.get("stopped_by_time") else ""
            row.append(
                f"{v:.3f}{mark} (lr {r['lr']:g}, {r.get('steps', 0)} steps)" if v is not None else r.get("status", "–")
            )
        row.append(_num(t.mean_accuracy(a), "{:.3f}"))
        rows.append(row)
    parts.append(
        "Accuracy on answer tokens at the training length (LM: validation bits per byte, lower is better); "
        "the best learning rate of the sweep, its step count; * = stopped by the time cap.\n\n" + _table(header, rows)
    )
    long_tasks = [task for task in t.tasks if len(task.lengths) > 1]
    if long_tasks:
        part = ["### Growing context", "Trained at the first length, scored at longer ones: token accuracy / exact "
                "match of the whole answer."]  # fmt: skip
        for task in long_tasks:
            rows = []
            for a in t.archs:
                by = (t.best(a, task) or {}).get("by_length", {})
                cells = [by.get(str(n)) for n in task.lengths]
                rows.append(
                    [a] + ["–" if c is None else f"{c['accuracy']:.3f} / {c['exact_match']:.3f}" for c in cells]
                )
            part.append(f"**{task.name}**\n\n" + _table(["architecture"] + [f"T = {n:,}" for n in task.lengths], rows))
        parts.append("\n\n".join(part))
    rows = []
    lrs = sorted({lr for v in t.sweep.values() for recs in v.values() for lr in recs})
    for a in t.archs:
        for task in t.tasks:
            recs = t.sweep.get(a, {}).get(task.name, {})
            if len(recs) > 1 or task.sweep:
                key = "bpb" if task.kind == "lm" else "accuracy"
                rows.append(
                    [a, task.name]
                    + [
                        (
                            _num(recs[lr].get(key), "{:.3f}")
                            if recs[lr].get("status") == "ok"
                            else recs[lr].get("status", "–")
                        )
                        if lr in recs
                        else "–"
                        for lr in lrs
                    ]
                )
    if rows:
        parts.append(
            "### Learning-rate sweep\n\n" + _table(["architecture", "task"] + [f"lr {lr:g}" for lr in lrs], rows)
        )
    return "\n\n".join(parts)


def _speed_section(t: Tables, suite: Suite) -> str:
    parts = []
    for title, table, lengths, key, fmt in (
        (
            "Training throughput (tokens/s; forward + backward + AdamW)",
            t.train,
            suite.train_lens,
            "tokens_per_s",
            lambda v: f"{v:,.0f}",
        ),
        ("Peak training memory", t.train, suite.train_lens, "peak_mem_bytes", _bytes),
        ("Prefill latency (ms, batch 1)", t.infer, suite.infer_lens, "prefill_s", lambda v: f"{v * 1e3:,.1f}"),
        (
            "Decode latency (ms per token, batch 1, after a prompt of T tokens)",
            t.infer,
            suite.infer_lens,
            "decode_s_per_token",
            lambda v: f"{v * 1e3:,.2f}",
        ),
        (
            "Decode latency with the step captured in a CUDA graph (ms per token, batch 1)",
            t.infer,
            suite.infer_lens,
            "decode_graph_s_per_token",
            lambda v: "–" if v is None else f"{v * 1e3:,.3f}",
        ),
    ):
        if key == "decode_graph_s_per_token" and not any(key in r for v in table.values() for r in v.values()):
            continue  # CUDA only
        rows = [[a] + [_speed_cell(table.get(a, {}).get(n), key, fmt) for n in lengths] for a in t.archs]
        parts.append(f"### {title}\n\n" + _table(["architecture"] + [f"T = {n:,}" for n in lengths], rows))
    rows = []
    for a in t.archs:
        r = t.cache.get(a, {})
        cb = r.get("cache_bytes", {})
        rows.append([a] + [_bytes(cb.get(str(n))) for n in suite.cache_lens])
    parts.append(
        "### Inference cache (batch 1; KV caches in bf16, recurrent states as the mixers keep them)\n\n"
        + _table(["architecture"] + [f"{n:,}" for n in suite.cache_lens], rows)
    )
    if any(r.get("tflops") for v in t.train.values() for r in v.values()):
        rows = [
            [a] + [_speed_cell(t.train.get(a, {}).get(n), "tflops", lambda v: f"{v:.2f}") for n in suite.train_lens]
            for a in t.archs
        ]
        parts.append(
            "### Achieved training TFLOP/s (model FLOPs, forward + backward = 3 forwards)\n\n"
            + _table(["architecture"] + [f"T = {n:,}" for n in suite.train_lens], rows)
        )
    return "\n\n".join(parts)


def _literature_section(t: Tables, meta: dict) -> str:
    rows = []
    archs = meta.get("archs", {})
    for a in t.archs:
        cfg = archs.get(a, {}).get("quality_config")
        try:
            cls = literature.classify(ModelConfig.from_dict(cfg)) if cfg else None
        except (ValueError, KeyError):
            cls = None
        for task in t.tasks:
            if task.kind != "mqar":
                continue
            r = t.best(a, task)
            if r is not None:
                rows.append(
                    {
                        "task": task.name,
                        "arch": a,
                        "class": cls,
                        "accuracy": r.get("accuracy", 0.0),
                        "state_bytes": r.get("state_bytes"),
                    }
                )
    if not rows:
        return "No MQAR results yet."
    parts = [f"Published: {literature.PUBLISHED}", ""]
    table = [
        [r["task"], r["arch"], r["class"] or "other", f"{r['accuracy']:.3f}", _bytes(r["state_bytes"])] for r in rows
    ]
    parts.append(_table(["task", "architecture", "class", "accuracy", "state at T (bf16 KV / fp32 state)"], table))
    verdicts = literature.check_mqar(rows)
    parts.append("\nOver the grid:\n\n" + "\n".join(f"- {line}" for line in literature.summarize(verdicts)))
    for v in verdicts:
        lines = [f"- {name}: **{status}** ({why})" for name, status, why in v["checks"]]
        parts.append(f"\n**{v['task']}**\n\n" + "\n".join(lines))
        if v["budget_note"]:
            parts.append(
                "  Attention did not solve this task here, so the training budget was too small for the "
                "published ordering to show; the comparisons above are indicative only."
            )
    parts.append(
        "\nState sizes differ between architectures at equal width: the published comparisons are at "
        "equal state size, so read the accuracy together with the state column."
    )
    return "\n".join(parts)


def _settings_section(suite: Suite, meta: dict) -> str:
    rows = []
    for task in suite.tasks:
        opts = ", ".join(f"{k}={v}" for k, v in task.options.items())
        rows.append(
            [
                task.name,
                task.kind,
                str(task.train_len),
                ", ".join(map(str, task.lengths)),
                str(task.vocab_size),
                opts or "–",
                f"{task.n_train:,} / {task.n_test:,}" if task.kind != "lm" else f"text stream / {task.n_test} windows",
                str(task.batch_size),
                str(task.steps),
                "yes" if task.sweep else "best swept lr",
            ]
        )
    budget = (
        f"{suite.time_budget_s:.0f} s in all: {suite.quality_share:.0%} shared equally by the quality cells "
        "(each cell's step count is set from a timing of its own training step, up to the task's maximum; "
        "a fifth of the cell is kept for scoring) and the rest shared equally by the architectures' speed "
        "cells (a length that does not fit ends the sweep)"
        if suite.time_budget_s
        else f"fixed step counts (each cell capped at {suite.cell_time_cap_s:.0f} s)"
    )
    data = meta.get("data") or {}
    lines = [
        _table(
            [
                "task",
                "generator",
                "train length",
                "eval lengths",
                "vocab",
                "options",
                "examples train / test",
                "batch",
                "max steps",
                "lr",
            ],
            rows,
        ),
        "",
        f"- Learning rates swept: {', '.join(f'{lr:g}' for lr in suite.lrs)} (AdamW, weight decay 0.1, warm-up 10%, "
        "cosine to 10%); tasks that are not swept use each architecture's best swept rate.",
        f"- Budget: {budget}."
        + (
            " Time-based budgets follow the machine: on one shared with other work, step counts (and so the "
            "figures) vary with its load; the step column says what each architecture got."
            if suite.time_budget_s
            else ""
        ),  # fmt: skip
        f"- Model sizes: quality tasks at preset size `{suite.quality_size}`, speed at `{suite.speed_size}` "
        "(unless --arch names a size); vocabulary resized per task.",
        f"- Speed: training steps of {suite.train_tokens:,} tokens (batch = tokens / T) at T = "
        f"{', '.join(map(str, suite.train_lens))}; prefill and {suite.decode_tokens} decode steps at contexts "
        f"{', '.join(map(str, suite.infer_lens))}; median of {suite.repeats} after a warm-up that also measures "
        f"memory; a length whose single step takes over {suite.speed_time_cap_s:.0f} s ends that sweep.",
        f"- LM data: {data.get('source', '–')} ({data.get('train_tokens', 0):,} train / {data.get('val_tokens', 0):,} "
        "validation bytes).",
        f"- Seeds: {meta.get('seeds', {})}.",
    ]
    return "\n".join(lines)


def _code_versions(data: dict[str, Any], planned: list[str]) -> dict[str, int]:
    """Cells per code version (see `store.code_stamp`) among the planned cells that have results."""
    counts: dict[str, int] = {}
    for cid in planned:
        cell = data["cells"].get(cid)
        if cell is not None:
            code = cell.get("code", "an unrecorded version")
            counts[code] = counts.get(code, 0) + 1
    return counts


def write_report(folder: str | Path, data: dict[str, Any], suite: Suite, archs: list, planned: list[str]) -> Path:
    """Write report.md and the plots into `folder`; returns the report's path."""
    folder = Path(folder)
    labels = [a.label if hasattr(a, "label") else str(a) for a in archs]
    t = collect(data, suite, labels, planned)
    plots = write_plots(folder, t)
    machine, vers = data.get("machine", {}), data.get("versions", {})
    run = data.get("run", {})
    status = (
        "complete"
        if run.get("complete", True) and t.missing == 0
        else (f"partial: {t.missing} of {len(planned)} cells not run yet (run the same command again to resume)")
    )
    hw = machine.get("gpu") or f"{machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores"
    sections = [
        f"# effarch arena: {suite.name} suite",
        f"{time.strftime('%Y-%m-%d')} on {hw} ({data.get('device', '?')}); torch {vers.get('torch')}, "
        f"triton {vers.get('triton')}, effarch {vers.get('effarch')}, Python {vers.get('python')}. Status: {status}.",
        "## Verdict\n\n" + "\n".join(f"- {line}" for line in verdict(t)),
        "## Architectures\n\n" + _arch_section(t, data),
        "## Quality\n\n" + _quality_section(t),
        "## Speed and memory\n\n" + _speed_section(t, suite),
        "## Check against the literature (MQAR)\n\n" + _literature_section(t, data),
        "## Plots\n\n" + ("\n".join(f"![{p[:-4]}]({p})" for p in plots) or "No plots yet."),
        "## Settings\n\n" + _settings_section(suite, data),
    ]
    notes = list(data.get("notes", []))
    grouped: dict[str, list[str]] = {}  # one line per distinct failure, listing its cells
    for cid, note in t.failures:
        grouped.setdefault(note, []).append(cid)
    for note, cids in grouped.items():
        shown = ", ".join(cids[:4]) + (f" and {len(cids) - 4} more" if len(cids) > 4 else "")
        notes.append(f"{len(cids)} cell(s) failed with `{note}`: {shown}")
    codes = _code_versions(data, planned)
    if len(codes) > 1:
        counts = ", ".join(f"{n} by {code}" for code, n in sorted(codes.items(), key=lambda kv: -kv[1]))
        notes.append(
            f"The figures were measured by {len(codes)} versions of effarch's code ({counts}): cells are kept when "
            "the code changes, so compare across versions with care; delete cells (or run with --fresh) to re-measure."
        )
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    path = folder / "report.md"
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path


def results_section(report: str) -> tuple[str, str]:
    """(title, body) of a dated RESULTS.md section holding a written report: its header line (date, machine,
    versions: where the figures were measured, not where this runs), then every section but the plots (images kept
    beside the report), headings moved one level down to sit under the section's own (`##`)."""
    lines = report.strip("\n").splitlines()
    if not lines or not lines[0].startswith("# effarch arena: "):
        raise ValueError("report.md does not start with the arena's title; rewrite it with --report-only")
    title = "Arena, " + lines[0].removeprefix("# effarch arena: ")
    blocks = "\n".join(lines[1:]).strip("\n").split("\n## ")
    kept = [blocks[0].strip()] + ["## " + b.strip() for b in blocks[1:] if not b.startswith("Plots")]
    body = "\n\n".join(kept)
    body = "\n".join("#" + line if line.startswith("#") else line for line in body.splitlines())
    return title, body
