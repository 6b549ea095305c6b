"""What a run directory says about its run, read from its files only.

The one reader of run-dir state: the live progress of `parsl-run` (`workflows.progress`) polls it a few
times a second from the parsl-run process, and ``parsl-run status RUN_DIR`` (`workflows.status`) reads it
once, from any machine that sees the directory. It never contacts Parsl, the trainer or a scheduler:
stage states come from ``summary.json`` (rewritten by `parsl-run` at each stage's start and end), data
preparation's progress from the chunk summaries (`data_prep.pipeline.ChunkCounter`), training's from
``train/metrics.jsonl``, read as it grows.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.pipeline import ChunkCounter, ChunkProgress
from janus.metrics import VALIDATION
from workflows.rundir import RunPaths, holder_alive, last_holder

RECENT_STEPS = 20  # training records that throughput and the ETA are averaged over
FIRST_READ_BYTES = 64 << 20  # a longer metrics.jsonl is read from its last 64 MiB (~40,000 steps)
MARK = f'"{VALIDATION}"'  # in a validation line of metrics.jsonl, never in a training line


@dataclass
class StageState:
    name: str
    status: str = "pending"  # pending, running, ran, skipped (...), stale, failed, interrupted
    start: float | None = None
    end: float | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        if self.start is None:
            return None
        return (self.end or time.time()) - self.start


@dataclass
class TrainingState:
    step: int = 0
    total: int | None = None
    loss: float | None = None
    atoms_per_s: float | None = None
    eta_s: float | None = None
    validation: list[dict[str, Any]] = field(default_factory=list)  # the newest, one per set of weights


class MetricsFollower:
    """``train/metrics.jsonl`` read as it grows: each `poll` reads only the lines appended since the last
    one (the whole file again only when a resume rewrote it), so polling costs next to nothing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_STEPS)
        self.validation: list[dict[str, Any]] = []
        self.new_validations: list[dict[str, Any]] = []  # not yet taken by the caller, which empties it
        self._offset = 0
        self._inode: int | None = None
        self._skip_first = False  # the first read starts inside a line
        self._reported: set[tuple[int, str]] = set()  # (step, weights) put in new_validations

    def poll(self) -> bool:
        """Read what was appended; True when there were new lines."""
        try:
            stat = self.path.stat()
        except OSError:
            return False
        if stat.st_ino != self._inode or stat.st_size < self._offset:  # new file, or cut back on resume
            self._inode, self.recent, self.validation = stat.st_ino, deque(maxlen=RECENT_STEPS), []
            self._offset = max(0, stat.st_size - FIRST_READ_BYTES)
            self._skip_first = self._offset > 0
        if stat.st_size == self._offset:
            return False
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            text = handle.read(stat.st_size - self._offset)
        start = text.find(b"\n") + 1 if self._skip_first else 0
        self._skip_first = False
        complete = text[: text.rfind(b"\n") + 1]
        first = self._offset == 0 or start > 0
        self._offset += len(complete)
        self._take(complete[start:].decode(errors="replace").splitlines(), first)
        return bool(complete)

    def _take(self, lines: list[str], first: bool) -> None:
        """Parse only what is kept: the last ``RECENT_STEPS`` training lines and the validation lines (on
        the first read of a file, only its newest validation's)."""
        marked = [line for line in lines if MARK in line]
        if first and marked:  # a validation writes one line per set of weights
            step = (_parse(marked[-1]) or {}).get("step")
            marked = [line for line in marked[-8:] if (_parse(line) or {}).get("step") == step]
        for record in filter(None, map(_parse, marked)):
            if record.get("kind") != VALIDATION:
                continue
            if self.validation and self.validation[0]["step"] != record["step"]:
                self.validation = []
            self.validation.append(record)
            if (record["step"], record["weights"]) not in self._reported:
                self._reported.add((record["step"], record["weights"]))
                self.new_validations.append(record)
        training = [line for line in lines if MARK not in line][-RECENT_STEPS:]
        self.recent.extend(r for r in map(_parse, training) if r and "step" in r)

    def training(self, total: int | None, budget_s: float | None) -> TrainingState:
        """Step, loss, throughput and ETA from the newest records (ETA from the training clock's seconds
        per step over them, validation and checkpoints included; the time budget caps it)."""
        if not self.recent:
            return TrainingState(total=total, validation=self.validation)
        last, first = self.recent[-1], self.recent[0]
        seconds = sum(r.get("step_time_s", 0.0) for r in self.recent)
        atoms_per_s = sum(r.get("atoms", 0) for r in self.recent) / seconds if seconds > 0 else None
        per_step = None
        if last["step"] > first["step"] and "elapsed_s" in last and "elapsed_s" in first:
            per_step = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
        elif seconds > 0:
            per_step = seconds / len(self.recent)
        eta = None
        if per_step is not None and total is not None:
            eta = max(0, total - last["step"]) * per_step
            if budget_s is not None and "elapsed_s" in last:
                eta = min(eta, max(0.0, budget_s - last["elapsed_s"]))
        return TrainingState(last["step"], total, last.get("loss"), atoms_per_s, eta, self.validation)


@dataclass
class RunState:
    """One reading of a run directory."""

    stages: list[StageState]
    state: str  # running, finished, failed, interrupted, not started
    site: str | None
    data: ChunkProgress | None
    training: TrainingState
    holder: str  # the lock-file line of the last parsl-run here
    written: float | None  # when parsl-run last wrote summary.json
    parsl_run_dir: str | None  # Parsl's run information of the last parsl-run, relative to the run dir


class RunReader:
    """Reads a run directory's state; keeps what makes the next reading cheap (the metrics offset, the
    chunk summaries already counted, the run config)."""

    def __init__(self, run_dir: Path) -> None:
        self.paths = RunPaths(Path(run_dir))
        self.metrics = MetricsFollower(self.paths.train / "metrics.jsonl")
        self._chunks = ChunkCounter(self.paths.data)
        self._train_config: dict[str, Any] | None = None
        self._data: ChunkProgress | None = None
        self._data_running = False

    def read(self) -> RunState:
        summary = _read_json(self.paths.summary) or {}
        holder = last_holder(self.paths)
        failed = any(record.get("status") == "failed" for record in summary.get("stages", {}).values())
        state = summary.get("state") or ("not started" if not summary else "failed" if failed else "finished")
        if state == "running" and holder_alive(holder) is False:
            state = "interrupted"
        stages = []
        for name, record in summary.get("stages", {}).items():
            stage = StageState(name, record.get("status", "pending"), record.get("start"), record.get("end"),
                               record.get("detail", ""))  # fmt: skip
            if stage.status == "running" and state == "interrupted":
                stage.status = "interrupted"
            stages.append(stage)
        self.metrics.poll()
        train = self._train()
        data_running = any(s.name == "data" and s.status == "running" for s in stages)
        if self._data is None or data_running or self._data_running:
            self._data = self._chunks.progress()  # once more after the stage ends: its last chunks
        self._data_running = data_running
        return RunState(
            stages=stages, state=state, site=summary.get("site"), data=self._data,
            training=self.metrics.training(train.get("steps"), train.get("time_budget_s")),
            holder=holder, written=summary.get("written"), parsl_run_dir=summary.get("parsl_run_dir"),
        )  # fmt: skip

    def _train(self) -> dict[str, Any]:
        if self._train_config is None:
            try:
                self._train_config = (yaml.safe_load(self.paths.run_config.read_text()) or {}).get("train")
            except (OSError, yaml.YAMLError):
                return {}
        return self._train_config or {}


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


CAUSE = re.compile(r"(\w+(Error|Exception|Interrupt|Failure)\b|^janus[.\w]*:|exit code|[Kk]illed|Signal \d+)")


def failure_cause(detail: str) -> str:
    """One line of a failed stage's detail that says why: the last line naming an error (for training,
    the tail of ``train.err`` follows the Parsl error), else the first line."""
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    named = [line for line in lines[1:] if CAUSE.search(line) and not line.startswith("(full log")]
    return (named[-1] if named else lines[0]) if lines else ""


LAUNCHED = re.compile(r"\[Scaling executor (\S+)\] Launched block (\S+) with job ID (\S+)")


def parsl_jobs(parsl_log: Path) -> list[tuple[str, str, str]]:
    """(executor, block, job id) of each block Parsl launched, from its ``parsl.log``."""
    found = []
    try:
        with Path(parsl_log).open(errors="replace") as handle:
            for line in handle:
                if "Launched block" in line and (match := LAUNCHED.search(line)):
                    found.append(match.groups())
    except OSError:
        return []
    return found


def newest_checkpoint(train_dir: Path, verify: bool) -> tuple[str | None, list[str]]:
    """The newest checkpoint that verifies (or, ``verify`` False, the newest complete one), and a line
    for each newer one that does not."""
    from janus.checkpoint import complete, problem

    rejected = []
    for path in complete(Path(train_dir) / "checkpoints"):
        wrong = problem(path) if verify else None
        if wrong is None:
            return path.name, rejected
        rejected.append(f"{path.name}: {wrong}")
    return None, rejected
