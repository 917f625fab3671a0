"""Where the benchmark scripts write: dated sections appended to benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from effarch.benchmarking import append_results, environment

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
