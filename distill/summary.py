"""Console tables for the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    """Wide enough for the report's tables also when stdout is a log file (rich: 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_comparison(results: dict[str, dict], stage_seconds: dict[str, float]) -> None:
    table = Table(title="teacher vs student (held-out test split)")
    for col in ("model", "parameters", "perplexity", "eval tokens", "eval wall s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['parameters']:,}",
            f"{r['perplexity']:.2f}",
            f"{r['tokens']:,}",
            f"{r['seconds']:.1f}",
        )
    stages = Table(title="wall time")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for name, seconds in stage_seconds.items():
        stages.add_row(name, f"{seconds:.1f}")
    console = _console()
    console.print(table)
    console.print(stages)


def print_headline(report: dict) -> None:
    from eval.report import (
        headline_header,
        headline_rows,
        metric_header,
        metric_rows,
        noise_note,
        sample_sizes,
    )

    console = _console()
    for title, header, rows in (
        ("teacher vs students", headline_header(report), headline_rows(report)),
        ("all metrics [95% bootstrap interval]", metric_header(report), metric_rows(report)),
    ):
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="left" if col in ("model", "metric") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"sample sizes: {sample_sizes(report)}")
    console.print(noise_note(report))
    console.print(f"eval wall time: {report['seconds']['total']:.1f} s")
