"""One run directory: its layout, the run config it was made with, and the one `parsl-run` working in it.

A rerun of the same command resumes the run. A rerun whose run config differs is refused, naming each
changed field, unless the change is one a resume can honour (where it runs: ``site``, ``launch``,
``parallel``; how often it saves) or, with ``--extend``, a longer run (``train.steps``,
``train.time_budget_s``). Two `parsl-run` in one directory would interleave their metrics and prune each
other's checkpoints, so each holds an exclusive lock on ``RUN_DIR/.parsl-run.lock`` while it runs.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from janus.overrides import ConfigError

RESUMABLE = ("site.", "launch.", "parallel.", "train.checkpoint_every", "train.keep_checkpoints",
             "train.peak_tflops")  # fmt: skip
EXTENDABLE = ("train.steps", "train.time_budget_s")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def model(self) -> Path:
        return self.export / "model.safetensors"

    @property
    def janus_config(self) -> Path:
        return self.train / "janus.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def run_config(self) -> Path:
        return self.root / "run_config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".parsl-run.lock"

    @property
    def runinfo(self) -> Path:
        """Parsl's run information: one numbered folder per `parsl-run` (``parsl.log``, submit scripts)."""
        return self.root / "runinfo"

    @property
    def monitoring_db(self) -> Path:
        """Parsl's MonitoringHub database, with ``site.monitoring`` on (read by ``parsl-visualize``)."""
        return self.runinfo / "monitoring.db"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def changes(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``field: (before, now)`` for every leaf of the run config that differs."""
    old, new = flatten(previous), flatten(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _longer(field: str, before: Any, now: Any) -> bool:
    if field == "train.steps":
        return isinstance(before, int) and isinstance(now, int) and now >= before
    return now is None or (before is not None and now >= before)


def check_resume(paths: RunPaths, current: dict[str, Any], extend: bool) -> None:
    """Refuse to resume ``paths`` with a run config that would no longer describe what it holds."""
    if not paths.run_config.is_file():
        return
    previous = yaml.safe_load(paths.run_config.read_text()) or {}
    refused = []
    for field, (before, now) in changes(previous, current).items():
        if field.startswith(RESUMABLE):
            continue
        if field in EXTENDABLE and extend and _longer(field, before, now):
            continue
        refused.append(f"{field}: {before!r} → {now!r}")
    if refused:
        hint = (
            "train.steps and train.time_budget_s may only grow, with --extend"
            if any(r.startswith(EXTENDABLE) for r in refused)
            else "rerun with the settings it was made with to resume it"
        )
        raise ConfigError(
            f"run directory {paths.root} holds a run made with other settings ({paths.run_config}):\n  "
            + "\n  ".join(refused)
            + f"\n{hint}, or give a new --run-dir to start another run"
        )


@contextmanager
def exclusive(paths: RunPaths) -> Iterator[None]:
    """Hold the run directory's lock (released by the kernel if this process dies); refuse if taken."""
    paths.root.mkdir(parents=True, exist_ok=True)
    handle = open(paths.lock, "a+")  # noqa: SIM115 (held open for the whole run: the lock lives on it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"run directory {paths.root} is in use by {holder}; wait for it to finish or give another "
            f"--run-dir{_if_gone(holder, paths.lock)}"
        ) from None
    except OSError as error:  # e.g. ENOLCK: a file system without locks (some NFS mounts)
        print(f"parsl-run: warning: cannot lock {paths.lock} ({error.strerror}); nothing stops a second "
              "parsl-run in this run directory", file=sys.stderr, flush=True)  # fmt: skip
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"parsl-run pid {os.getpid()} on {os.uname().nodename} since {time.ctime()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _if_gone(holder: str, lock: Path) -> str:
    """A hint when the recorded holder died on this host: a process it started still holds the lock."""
    if holder_alive(holder) is False:
        return f" (that process has ended; one it started still holds the lock: `fuser -v {lock}`)"
    return ""


def last_holder(paths: RunPaths) -> str:
    """The line the last `parsl-run` in ``paths`` wrote into the lock file (empty if none ran)."""
    try:
        return paths.lock.read_text().strip()
    except OSError:
        return ""


def holder_alive(holder: str) -> bool | None:
    """Whether the process named by a lock-file line still runs; None when that cannot be told here (it
    ran on another host, or the line is not one `exclusive` wrote)."""
    words = holder.split()
    if len(words) < 5 or words[:2] != ["parsl-run", "pid"] or words[4] != os.uname().nodename:
        return None
    try:
        os.kill(int(words[2]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except ValueError:
        return None
    return True


def set_aside_unreadable_memos(paths: RunPaths) -> list[str]:
    """Parsl's memo checkpoints (``runinfo/*/checkpoint/tasks.pkl``) that Parsl could not load, their
    folder renamed ``checkpoint.corrupt`` so that the run starts: Parsl refuses to start on one
    (`BadCheckpoint`), and each stage verifies its own outputs anyway. Read as Parsl reads them (a pickle
    stream of this run's own files: the same trust as Parsl's); returns a line per file set aside."""
    moved = []
    for memo in sorted(paths.runinfo.glob("*/checkpoint/tasks.pkl")):
        try:
            with open(memo, "rb") as handle:
                while True:
                    try:
                        record = pickle.load(handle)
                    except EOFError:
                        break
                    if not isinstance(record, dict) or "hash" not in record:
                        raise ValueError("a record without a task hash")
        except Exception as error:  # any failure to read is one Parsl would refuse to start on
            memo.parent.rename(memo.parent.with_name("checkpoint.corrupt"))
            moved.append(f"Parsl's memo checkpoint {memo} is unreadable ({type(error).__name__}); set aside")
    return moved
