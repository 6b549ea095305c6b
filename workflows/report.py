"""Console tables printed at the end of a run (rich)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_stage_table(records: dict) -> None:
    table = Table(title="stages")
    for column in ("stage", "status", "seconds"):
        table.add_column(column)
    for name, record in records.items():
        seconds = f"{record.end - record.start:.1f}" if record.start and record.end else ""
        table.add_row(name, record.status, seconds)
    Console().print(table)


def print_eval_table(metrics_path: Path) -> None:
    if not metrics_path.is_file():
        return
    metrics = json.loads(metrics_path.read_text())
    table = Table(title=f"held-out errors ({metrics_path})")
    for column in ("task", "structures", "energy MAE meV/atom", "force MAE meV/Å", "stress MAE meV/Å³"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for task, values in metrics["tasks"].items():
        stress = values.get("stress_mae_mev_per_a3")
        table.add_row(
            task,
            str(values["n_structures"]),
            f"{values['energy_mae_mev_per_atom']:.1f}",
            f"{values['force_mae_mev_per_a']:.1f}",
            "—" if stress is None else f"{stress:.2f}",
        )
    Console().print(table)
