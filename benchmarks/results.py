"""Where the benchmark scripts write: dated sections appended to benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from effarch.benchmarking import append_results, environment

RESULTS = Path(__file__).with_name("RESULTS.md")


def append_section(title: str, body: str) -> None:
    """Append a dated section (environment line included) to benchmarks/RESULTS.md."""
    append_results(RESULTS, title, body)


__all__ = ["RESULTS", "append_section", "environment"]
