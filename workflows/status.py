"""`parsl-run status RUN_DIR [--plot [PNG]] [--no-verify]`: how a running or finished run is doing.

Reads only the run directory's files (`workflows.runstate`), so it works from any machine that sees the
directory (a login node, another site) and never contacts Parsl or the scheduler: each stage's state and
times, training's step, loss and throughput, the newest validation errors per task, the newest verified
checkpoint, the Parsl job ids and where the logs are, and for a failed stage the cause in one line.
``--plot`` draws the training and validation curves of the run so far (`evaluation.plots.training_curves`).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workflows.progress import data_text, duration, stage_text, train_text
from workflows.rundir import RunPaths
from workflows.runstate import RunReader, RunState, failure_cause, newest_checkpoint, parsl_jobs

HINTS = {
    "failed": "fix the cause and rerun the same parsl-run command to resume",
    "interrupted": "parsl-run ended without recording an end (killed?); rerun the same command to resume",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parsl-run status", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="the run directory (parsl-run's --run-dir)")
    p.add_argument(
        "--plot", type=Path, nargs="?", const=Path("-"), metavar="PNG",
        help="write the training and validation curves so far (default RUN_DIR/eval/training.png)",
    )  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help="do not checksum the newest checkpoint")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    run_dir = args.run_dir.resolve()
    reader = RunReader(run_dir)
    if not (reader.paths.summary.is_file() or reader.paths.run_config.is_file()):
        print(f"parsl-run status: {run_dir} is not a run directory (no summary.json, no run_config.yaml)")
        return 2
    state = reader.read()
    console = Console(width=max(Console().width, 100))
    print_state(console, run_dir, state)
    print_training(console, reader, state, verify=not args.no_verify)
    print_parsl(console, run_dir, state)
    if args.plot is not None:
        print_plot(console, reader, None if str(args.plot) == "-" else args.plot)
    return 0


def print_state(console: Console, run_dir: Path, state: RunState) -> None:
    site = f" on site {state.site!r}" if state.site else ""
    say(console, f"run {run_dir}{site}: {state.state}")
    if state.holder:
        written = f"; summary written {duration(time.time() - state.written)} ago" if state.written else ""
        say(console, f"  last parsl-run: {state.holder}{written}")
    table = Table(title="stages", title_justify="left")
    for column in ("stage", "status", "started"):
        table.add_column(column)
    for stage in state.stages:
        table.add_row(stage.name, stage_text(stage), _clock(stage.start))
    console.print(table)
    if state.data is not None:
        say(console, f"data: {data_text(state.data)}")
    for stage in state.stages:
        if stage.status == "failed":
            say(console, f"stage {stage.name} failed: {failure_cause(stage.detail)}")
    if state.state in HINTS:
        say(console, HINTS[state.state])


def print_training(console: Console, reader: RunReader, state: RunState, verify: bool) -> None:
    training = state.training
    if training.step:
        say(console, f"training: {train_text(training)} (throughput and ETA over the last steps)")
    if training.validation:
        table = Table(title=f"validation at step {training.validation[0]['step']}", title_justify="left")
        for column in ("weights", "task"):
            table.add_column(column)
        for column in ("force MAE meV/Å", "zero-force MAE", "force cos", "energy MAE meV/atom"):
            table.add_column(column, justify="right")
        for record in training.validation:
            for task, v in record["tasks"].items():
                table.add_row(record["weights"], task, f"{v['force_mae_mev_per_a']:.1f}",
                              f"{v['force_zero_mae_mev_per_a']:.1f}", f"{v['force_cosine']:.3f}",
                              f"{v['energy_mae_mev_per_atom']:.1f}")  # fmt: skip
        console.print(table)
    found, damaged = newest_checkpoint(reader.paths.train, verify)
    for line in damaged:
        say(console, f"checkpoint {line}")
    how = "verified" if verify else "not verified"
    where = f"{reader.paths.train / 'checkpoints' / found} ({how})" if found else "none yet"
    say(console, f"newest checkpoint: {where}")
    if reader.paths.model.is_file():
        say(console, f"exported model: {reader.paths.model}")
    metrics = reader.paths.eval / "metrics.json"
    if metrics.is_file():
        from workflows.report import print_eval_table

        print_eval_table(metrics)


def print_parsl(console: Console, run_dir: Path, state: RunState) -> None:
    if not state.parsl_run_dir:
        return
    parsl_dir = run_dir / state.parsl_run_dir
    jobs = parsl_jobs(parsl_dir / "parsl.log")
    listed = ", ".join(f"{executor} block {block}: {job}" for executor, block, job in jobs) or "none"
    say(console, f"Parsl jobs (executor block: job id): {listed}")
    logs = [parsl_dir / "parsl.log", parsl_dir / "submit_scripts", run_dir / "train" / "train.log",
            run_dir / "train" / "train.err"]  # fmt: skip
    say(console, "logs: " + ", ".join(str(p) for p in logs if p.exists()))
    database = RunPaths(run_dir).monitoring_db
    if database.is_file():
        say(console, f"Parsl monitoring: parsl-visualize sqlite:///{database}")


def print_plot(console: Console, reader: RunReader, path: Path | None) -> None:
    from evaluation.plots import training_curves

    target = path or reader.paths.eval / "training.png"
    written = training_curves(reader.paths.train / "metrics.jsonl", target)
    say(console, f"training plot: {written}" if written else "training plot: no training step yet")


def say(console: Console, line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True, markup=False)


def _clock(when: float | None) -> str:
    return datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S") if when else ""
