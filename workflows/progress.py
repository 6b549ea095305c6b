"""Live progress of a `parsl-run` on its console: which stage runs, and how far it is.

A thread of the parsl-run process reads the run directory (`workflows.runstate.RunReader`) every
``POLL_S`` seconds, so the stages, which run in Parsl's worker processes and in the training ranks, pay
nothing for it: the trainer only appends to ``metrics.jsonl`` as it always does. On a terminal the view
is a table redrawn in place (rich); otherwise (a log file, CI) it prints plain lines: each change of a
stage's state, a progress line per stage at most every ``PLAIN_EVERY_S`` seconds and at the last step,
and each validation as the trainer scores it. The formatters are shared with ``parsl-run status``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from data_prep.pipeline import ChunkProgress
from janus.validation import describe
from workflows.runstate import RunReader, RunState, StageState, TrainingState

POLL_S = 0.25
PLAIN_EVERY_S = 10.0


def duration(seconds: float | None) -> str:
    """A span of time for a person: 45 s, 3 min 07 s, 2 h 05 min."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def data_text(data: ChunkProgress | None) -> str:
    if data is None:
        return ""
    return (f"chunk {data.done} of {data.total} done, {data.accepted:,} structures accepted, "
            f"{data.quarantined:,} quarantined")  # fmt: skip


def train_text(training: TrainingState) -> str:
    if not training.step:
        return ""
    parts = [f"step {training.step} of {training.total if training.total is not None else '?'}"]
    if training.loss is not None:
        parts.append(f"loss {training.loss:.4g}")
    if training.atoms_per_s is not None:
        parts.append(f"{training.atoms_per_s:,.0f} atoms/s")
    if training.total is not None and training.step < training.total:
        parts.append(f"ETA {duration(training.eta_s)}")
    return ", ".join(parts)


def stage_text(stage: StageState) -> str:
    seconds = stage.seconds
    return stage.status + (f", {duration(seconds)}" if seconds is not None else "")


def stage_progress(stage: StageState, state: RunState) -> str:
    if stage.name == "data":
        return data_text(state.data)
    if stage.name == "train":
        return train_text(state.training)
    return ""


class PlainView:
    """Lines for a log: state changes, progress at most every ``PLAIN_EVERY_S`` s, and the last step."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status: dict[str, str] = {}
        self.shown: dict[str, tuple[str, float]] = {}  # stage: (last progress line, when)

    def show(self, state: RunState, validations: list[dict[str, Any]], final: bool = False) -> None:
        for stage in state.stages:
            before = self.status.get(stage.name, "pending")
            self.status[stage.name] = stage.status
            if stage.status != before and stage.status == "running":
                self.say(f"parsl-run: {stage.name}: running")
            if stage.status == "running" or (stage.status != before and before == "running"):
                self._progress(stage, state, final or stage.status != "running")
            if stage.name == "train":
                for record in validations:
                    self.say(describe([record]))
            if stage.status != before and stage.status != "running":
                self.say(f"parsl-run: {stage.name}: {stage_text(stage)}")

    def _progress(self, stage: StageState, state: RunState, last: bool) -> None:
        text = stage_progress(stage, state)
        shown, when = self.shown.get(stage.name, ("", 0.0))
        done = stage.name == "train" and state.training.step == state.training.total
        if text and text != shown and (last or done or time.monotonic() - when >= PLAIN_EVERY_S):
            self.shown[stage.name] = (text, time.monotonic())
            self.say(f"parsl-run: {stage.name}: {text}")

    def say(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True, markup=False)

    def close(self) -> None:
        pass


class LiveView:
    """A table of the stages redrawn in place on a terminal; validations printed above it."""

    def __init__(self, console: Console) -> None:
        self.live = Live(console=console, auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
        self.live.start()

    def show(self, state: RunState, validations: list[dict[str, Any]], final: bool = False) -> None:
        for record in validations:
            self.live.console.print(describe([record]), highlight=False, soft_wrap=True, markup=False)
        self.live.update(render(state), refresh=True)

    def close(self) -> None:
        self.live.stop()


def render(state: RunState) -> Table | Group:
    table = Table(title=f"parsl-run: {state.state}", title_justify="left")
    for column in ("stage", "status", "", "progress"):
        table.add_column(column)
    for stage in state.stages:
        bar: Any = ""
        if stage.name == "data" and state.data and state.data.total:
            bar = ProgressBar(total=state.data.total, completed=state.data.done, width=20)
        elif stage.name == "train" and state.training.total:
            bar = ProgressBar(total=state.training.total, completed=state.training.step, width=20)
        table.add_row(stage.name, stage_text(stage), bar, stage_progress(stage, state))
    return table


class Watcher:
    """The thread that reads the run directory every ``POLL_S`` seconds and shows it."""

    def __init__(self, reader: RunReader, view: PlainView | LiveView) -> None:
        self.reader, self.view = reader, view
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="parsl-run-progress", daemon=True)

    def _loop(self) -> None:
        while not self.stopped.wait(POLL_S) and self.show_safely():
            pass

    def show_safely(self, final: bool = False) -> bool:
        """`show`; a view that fails says so once and stops, and never stops the run. False if it failed."""
        try:
            self.show(final)
        except Exception as error:
            print(f"parsl-run: warning: progress view stopped: {type(error).__name__}: {error}", flush=True)
            return False
        return True

    def show(self, final: bool = False) -> None:
        state = self.reader.read()
        validations, self.reader.metrics.new_validations = self.reader.metrics.new_validations, []
        self.view.show(state, validations, final)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.show_safely(final=True)  # what happened since the last reading: the last step, the last stage
        self.view.close()


@contextmanager
def live_progress(run_dir: Path, console: Console | None = None) -> Iterator[None]:
    """Show the progress of the run in ``run_dir`` on ``console`` while the body runs."""
    console = console or Console()
    view = LiveView(console) if console.is_terminal else PlainView(console)
    watcher = Watcher(RunReader(run_dir), view)
    watcher.show_safely()
    watcher.thread.start()
    try:
        yield
    finally:
        watcher.stop()
