"""Command-line glue for `effarch arena` and `effarch bench ops`: flags in, one call, 0 on success.

User mistakes raise ValueError with one sentence; the `effarch` command prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arena's flags to the `arena` subparser."""
    from effarch.arena.suites import SUITES

    parser.add_argument(
        "--suite",
        default="quick",
        choices=sorted(SUITES),
        help="quick: CPU, about 10 minutes (default); full: GPU, Zoology's MQAR grid and long contexts",
    )
    parser.add_argument(
        "--arch",
        action="append",
        default=None,
        metavar="SPEC",
        help="preset (name or name:size) or config JSON; repeat or comma-separate; "
        "default: one preset per survey family plus the hybrids",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="text for the LM task: a text file, a folder of text files or "
        "JSONL with a 'text' field (default: the Python standard library)",
    )
    parser.add_argument("--out", default=None, help="report folder (default: arena-<suite>); re-running resumes it")
    parser.add_argument("--fresh", action="store_true", help="redo every cell instead of resuming")
    parser.add_argument("--device", default="auto", help="auto (the suite's device), cpu or cuda")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="total time for the run's cells (overrides the suite's)",
    )
    parser.add_argument("--tasks", default=None, help="comma-separated task names or kinds to run (default: all)")
    parser.add_argument("--only", default=None, choices=["quality", "speed"], help="run only these cells")
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new cell after this long (resume later by running again)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes for the quality cells, one architecture each (default: one per GPU, 1 on a CPU); "
        "speed cells use one process per GPU; a time budget then applies to each process",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--redo",
        default=None,
        metavar="LIST",
        help="measure these stored cells again: kinds (quality, speed, cache, train, infer) and/or architectures, "
        "comma-separated (e.g. speed,mamba2: Mamba2's speed cells)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite report.md and the plots from --out's results.json; runs nothing (no GPU needed)",
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="FILE",
        help="also append the report's figures as a dated section to this markdown file (e.g. benchmarks/RESULTS.md)",
    )


def run(args: argparse.Namespace) -> int:
    from effarch.arena.runner import ArenaOptions, run_arena

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if getattr(args, "tasks", None) else None
    opts = ArenaOptions(
        suite=args.suite,
        archs=args.arch,
        data=args.data,
        out=args.out,
        fresh=args.fresh,
        device=args.device,
        time_budget_s=args.time_budget,
        tasks=tasks,
        only=args.only,
        stop_after_s=args.stop_after,
        progress=not args.quiet,
        workers=args.workers,
        report_only=args.report_only,
        redo=[r.strip() for r in args.redo.split(",") if r.strip()] if args.redo else None,
    )
    results_file = getattr(args, "results", None)
    if results_file is not None and Path(results_file).is_dir():
        raise ValueError(f"--results {results_file!r} is a folder; give the markdown file to append to")
    result = run_arena(opts)
    where = result.out / "report.md"
    if results_file is not None:
        append_report(where, Path(results_file))
        print(f"arena: figures appended to {results_file}")
    if opts.report_only:
        state = "complete" if result.complete else "partial"
        print(f"arena: report rewritten from {result.cells_skipped} stored cells ({state}): {where}")
        return 0
    table = summary_table(result.out / "results.json")
    if table:
        print(table)
    if result.complete:
        print(f"arena: {result.cells_run} cells run, {result.cells_skipped} resumed; report: {where}")
    else:
        print(
            f"arena: stopped after --stop-after with {result.cells_run} cells run; partial report: {where}; "
            "run the same command again to resume",
            file=sys.stderr,
        )
    if result.cells_failed:
        print(f"arena: {result.cells_failed} cells failed; see the Notes in {where}", file=sys.stderr)
    return 0


def append_report(report: Path, results: Path) -> None:
    """Append the report as a dated section to `results` (atomically; the file is created if missing)."""
    from effarch.arena.report import results_section
    from effarch.benchmarking import RESULTS_TITLE
    from effarch.utils import atomic_write_text

    title, body = results_section(report.read_text(encoding="utf-8"))
    date = body.split(" ", 1)[0]
    old = results.read_text(encoding="utf-8") if results.exists() else RESULTS_TITLE
    atomic_write_text(results, old.rstrip("\n") + f"\n\n## {date} - {title}\n\n{body}\n")


def summary_table(results_path: Path) -> str:
    """One line per architecture: validation bits per byte, mean synthetic accuracy, training tokens/s at
    the longest length all reached, and inference cache bytes per token (bf16) at long context."""
    try:
        data = json.loads(Path(results_path).read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    cells = data.get("cells", {})
    archs = list(dict.fromkeys(c["arch"] for c in cells.values() if "arch" in c))
    if not archs:
        return ""
    ok = [c for c in cells.values() if c.get("status") == "ok"]
    train_lens = sorted({c["length"] for c in ok if c.get("kind") == "train"})
    common = [
        n
        for n in train_lens
        if all(any(c.get("kind") == "train" and c["arch"] == a and c["length"] == n for c in ok) for a in archs)
    ]
    speed_len = common[-1] if common else None
    speed_head = "train tok/s" if speed_len is None else f"train tok/s @{speed_len}"
    rows = [f"{'architecture':<20} {'val bpb':>8} {'accuracy':>9} {speed_head:>18} {'cache B/token':>14}"]
    for a in archs:
        q = [c for c in ok if c.get("kind") == "quality" and c["arch"] == a]
        bpb = min((c["bpb"] for c in q if c.get("task_kind") == "lm"), default=None)
        best: dict[str, float] = {}
        for c in q:
            if c.get("task_kind") != "lm":
                best[c["task"]] = max(best.get(c["task"], 0.0), c.get("accuracy", 0.0))
        acc = sum(best.values()) / len(best) if best else None
        tps = next(
            (c["tokens_per_s"] for c in ok if c.get("kind") == "train" and c["arch"] == a and c["length"] == speed_len),
            None,
        )
        cache = next((c for c in ok if c.get("kind") == "cache" and c["arch"] == a), None)
        per_tok = None
        if cache:
            lens = sorted(cache["cache_bytes"], key=int)
            lo, hi = lens[-2], lens[-1]
            per_tok = (cache["cache_bytes"][hi] - cache["cache_bytes"][lo]) / (int(hi) - int(lo))
        fmt = lambda v, f: format("-", ">" + f.split(".")[0].rstrip(",")) if v is None else format(v, f)  # noqa: E731
        rows.append(f"{a:<20} {fmt(bpb, '8.3f')} {fmt(acc, '9.3f')} {fmt(tps, '18,.0f')} {fmt(per_tok, '14,.1f')}")
    return "\n".join(rows)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `effarch bench ops|train|generate`."""
    parser.add_argument(
        "what",
        choices=["ops", "train", "generate"],
        help="ops: op-level kernels side by side; train / generate: a model's training step or generation speed",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--results", default=None, help="markdown file to append to (default: benchmarks/RESULTS.md of this checkout)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the tables without appending them")
    parser.add_argument(
        "--no-scripts", action="store_true", help="skip the repository's benchmark scripts (benchmarks/linear_*.py)"
    )
    parser.add_argument(
        "--model", default="transformer:small", help="train/generate: preset (name:size) or config JSON"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="train: default 4; generate: default 1")
    parser.add_argument("--seq-len", type=int, default=1024, help="train: tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="train: timed steps (after 2 warm-up steps)")
    parser.add_argument("--prompt-len", type=int, default=128, help="generate: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="generate: tokens to generate")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="train: torch.compile the blocks first")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="train: replay the captured training step; generate: a captured decode step (CUDA)",
    )


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "ops":
        from effarch.arena.bench import run_ops_bench

        run_ops_bench(device=args.device, results=args.results, write=not args.no_write, scripts=not args.no_scripts)
        return 0
    from effarch.benchmarking import bench_model

    print(
        bench_model(
            args.what,
            args.model,
            device=args.device,
            dtype=args.dtype,
            batch=args.batch_size,
            seq_len=args.seq_len,
            steps=args.steps,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            compile_blocks=args.compile,
            cuda_graph=args.cuda_graph,
        )
    )
    return 0
