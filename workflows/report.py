"""Console tables printed at the end of a run (rich)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from evaluation.evaluate import COLUMNS, report_lines, table_rows

# The console table keeps to 100 columns; metrics.json and `python -m evaluation.evaluate` have every metric.
BRIEF = ("energy_mae_mev_per_atom", "force_mae_mev_per_a", "force_zero_mae_mev_per_a", "force_cosine",
         "n_unseen_elements")


def print_stage_table(records: dict) -> None:
    table = Table(title="stages")
    for column in ("stage", "status", "seconds"):
        table.add_column(column)
    for name, record in records.items():
        seconds = f"{record.end - record.start:.1f}" if record.start and record.end else ""
        table.add_row(name, record.status, seconds)
    Console().print(table)


def print_eval_table(metrics_path: Path) -> None:
    """Per-task held-out errors (and the baseline's, row under row, when the evaluation had one)."""
    if not metrics_path.is_file():
        return
    metrics = json.loads(metrics_path.read_text())
    header, rows = table_rows(metrics, [c for c in COLUMNS if c[1] in BRIEF])
    title = f"held-out errors ({metrics_path})"
    if "baseline" in metrics:
        title += f" vs baseline {metrics['baseline']['model']}"
    table = Table(title=title)
    table.add_column(header[0], no_wrap=True)  # full task names: users and tests grep for them
    for column in header[1:]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 100)).print(table)


def print_evaluation(metrics_path: Path) -> None:
    """The error table, then one line per MD stability run, the finite-difference check and the plots."""
    print_eval_table(metrics_path)
    if metrics_path.is_file():
        for line in report_lines(json.loads(metrics_path.read_text())):
            Console().print(line, highlight=False, soft_wrap=True)
