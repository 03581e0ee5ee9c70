"""Console tables for the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


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
    console = Console()
    console.print(table)
    console.print(stages)
