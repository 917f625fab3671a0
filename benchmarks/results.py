"""Where the benchmark scripts write: dated sections appended to benchmarks/RESULTS.md."""

from __future__ import annotations

import ast
import importlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from effarch.benchmarking import append_results, environment
from effarch.utils import atomic_write_text

RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_shapes(text: str, option: str = "--shapes", fields: str = "BATCHxLENGTH", example: str = "16x2048,1x32768"):
    """ "16x2048,4x8192" -> [(16, 2048), (4, 8192)]: tuples of as many positive integers as `fields` names (x-joined);
    anything else exits with one sentence naming the option and the expected form."""
    n = len(fields.split("x"))
    shapes = []
    for part in text.split(","):
        values = part.strip().lower().split("x")
        if len(values) != n or not all(v.isdigit() and int(v) > 0 for v in values):
            raise SystemExit(
                f"{option} {text!r} must be a comma-separated list of {fields} (positive integers), e.g. {example}"
            )
        shapes.append(tuple(int(v) for v in values))
    return shapes


def append_section(title: str, body: str) -> None:
    """Append a dated section (environment line included) to benchmarks/RESULTS.md."""
    append_results(RESULTS, title, body)


__all__ = ["RESULTS", "append_section", "environment", "parse_shapes"]


def apply_settings(items: list[str], option: str = "--set") -> list[str]:
    """--set module.NAME=value (repeatable): set a launch or layer setting of an effarch module for this run, value
    a Python literal (32, "doubling", (32, 64), True); anything else exits with one sentence. Returns the
    settings as given, for the rows' labels."""
    for item in items:
        target, _, text = item.partition("=")
        module_name, _, name = target.strip().rpartition(".")
        try:
            if not module_name.startswith("effarch.") or not name:
                raise ValueError
            module = importlib.import_module(module_name)
            if not hasattr(module, name):
                raise ValueError
            setattr(module, name, ast.literal_eval(text.strip()))
        except (ValueError, SyntaxError, ImportError):
            raise SystemExit(
                f"{option} {item!r}: give effarch.MODULE.NAME=VALUE for an existing setting, VALUE a Python literal "
                "(e.g. effarch.ops.fused.norm.FWD_TILE=4096)"
            ) from None
    return list(items)


def pick_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when present, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure_and_report(shapes: Iterable[tuple], measure: Callable[..., list[dict]], table: Callable[[list[dict]], str],
                       args, device: torch.device, title: str) -> list[dict]:  # fmt: skip
    """Rows of measure(*shape) for each shape, each printed as JSON when measured; then the table printed, the
    raw rows written to --json (atomically, with the environment), and with --write on a GPU the table appended to
    RESULTS.md under `title`."""
    rows = []
    for shape in shapes:
        for row in measure(*shape):
            rows.append(row)
            print(json.dumps(row), flush=True)
    body = table(rows)
    print(body)
    if args.json:
        atomic_write_text(args.json, json.dumps({"environment": environment(), "rows": rows}, indent=1))
    if args.write and device.type == "cuda":
        append_section(title, body)
    return rows
