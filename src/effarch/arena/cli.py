"""Command-line glue for `effarch arena` and `effarch bench ops`: flags in, one call, 0 on success.

User mistakes raise ValueError with one sentence; the `effarch` command prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


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
    )
    result = run_arena(opts)
    where = result.out / "report.md"
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


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `effarch bench ops`."""
    parser.add_argument("what", choices=["ops"], help="ops: op-level kernels side by side")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--results", default=None, help="markdown file to append to (default: benchmarks/RESULTS.md of this checkout)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the tables without appending them")
    parser.add_argument(
        "--no-scripts", action="store_true", help="skip the repository's benchmark scripts (benchmarks/linear_*.py)"
    )


def run_bench(args: argparse.Namespace) -> int:
    from effarch.arena.bench import run_ops_bench

    run_ops_bench(device=args.device, results=args.results, write=not args.no_write, scripts=not args.no_scripts)
    return 0
