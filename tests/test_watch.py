"""Watching a run: the live progress in plain mode, `parsl-run status` on a finished run, on a run killed
in training and on a run whose data stage failed, and Parsl's monitoring database (``site.monitoring``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from janus.metrics import read, training_records
from tests.conftest import ROOT, SMALL_RUN, parsl_run
from tests.test_hostile_data import HYDROGEN, frame
from workflows.rundir import RunPaths

pytestmark = pytest.mark.slow

# SMALL_RUN, shorter: 6 steps, validation at steps 3 and 6, no MD.
WATCHED_RUN = [*SMALL_RUN, "--set", "train.steps=6", "--set", "train.checkpoint_every=3",
               "--set", "train.eval_every=3", "--set", "eval.md_steps=0"]  # fmt: skip


def status(run_dir: Path, *args: str) -> str:
    result = parsl_run("status", str(run_dir), *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return " ".join(result.stdout.split())  # rich may wrap a table cell: compare word by word


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A run with Parsl monitoring on, to its end, with its console output (not a terminal: plain)."""
    run_dir = tmp_path_factory.mktemp("watch") / "run"
    result = parsl_run("workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *WATCHED_RUN,
                       "--set", "site.monitoring=true")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_plain_progress_names_each_stage_and_reaches_the_last_step(finished):
    _, output = finished
    lines = output.splitlines()
    for stage in ("data", "train", "export", "evaluate"):
        assert f"parsl-run: {stage}: running" in lines, stage
        assert any(line.startswith(f"parsl-run: {stage}: ran, ") for line in lines), stage
    chunks = [line for line in lines if line.startswith("parsl-run: data: chunk ")]
    assert re.fullmatch(r"parsl-run: data: chunk (\d+) of \1 done, 4,104 structures accepted, 0 quarantined",
                        chunks[-1]), chunks  # fmt: skip
    steps = [line for line in lines if line.startswith("parsl-run: train: step ")]
    assert steps[-1].startswith("parsl-run: train: step 6 of 6, loss "), steps
    assert "atoms/s" in steps[-1] and all("ETA" in line for line in steps[:-1])
    assert [line.split(" (")[0] for line in lines if line.startswith("janus: validation")] == [
        "janus: validation at step 3", "janus: validation at step 6"]  # fmt: skip
    order = [lines.index(f"parsl-run: {stage}: running") for stage in ("data", "train", "export", "evaluate")]
    assert order == sorted(order) and lines.index(steps[-1]) < order[2]
    assert "\x1b[" not in output, "no terminal control codes in plain mode"


def test_status_of_a_finished_run(finished, tmp_path):
    run_dir, _ = finished
    text = status(run_dir, "--plot", str(run_dir / "now.png"))
    assert f"run {run_dir} on site 'local': finished" in text
    for stage in ("data", "train", "export", "evaluate"):
        assert re.search(rf"│ {stage} +│ ran, ", text), stage
    assert "step 6 of 6, loss" in text and "atoms/s" in text
    assert "validation at step 6" in text and "crystal-pbe" in text and "molecule-gfn2" in text
    assert f"newest checkpoint: {run_dir}/train/checkpoints/step_000000006 (verified)" in text
    assert re.search(r"Parsl jobs \(executor block: job id\): stages block 0: \d+", text)
    assert f"{run_dir}/runinfo/000/parsl.log" in text and f"{run_dir}/train/train.err" in text
    assert "held-out errors" in text
    assert (run_dir / "now.png").read_bytes()[:4] == b"\x89PNG"
    moved = tmp_path / "elsewhere"  # as a run dir mounted at another path, or copied from another site
    shutil.copytree(run_dir, moved)
    text = status(moved, "--no-verify")
    assert f"run {moved} on site 'local': finished" in text and f"{moved}/runinfo/000/parsl.log" in text
    assert f"{moved}/train/checkpoints/step_000000006 (not verified)" in text


def test_monitoring_records_the_run_tasks(finished):
    run_dir, _ = finished
    database = RunPaths(run_dir).monitoring_db
    with contextlib.closing(sqlite3.connect(database)) as db:
        workflows = db.execute(
            "SELECT workflow_name, tasks_completed_count, tasks_failed_count FROM workflow"
        ).fetchall()
        tasks = db.execute("SELECT task_func_name, count(*) FROM task GROUP BY task_func_name").fetchall()
    chunks = len(json.loads((run_dir / "data" / "plan.json").read_text())["chunks"])
    assert dict(tasks) == {
        "prepare_chunk": chunks,
        "finalize_data": 1,
        "train": 1,
        "export": 1,
        "evaluate": 1,
    }
    assert workflows == [("matris-janus", chunks + 4, 0)]


def test_status_of_a_run_killed_in_training(finished, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished[0] / "data", run_dir / "data")  # prepared already: the chunks are reused
    args = ["workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *WATCHED_RUN,
            "--set", "train.steps=40", "--set", "train.sleep_per_step_s=0.5"]  # fmt: skip
    exe = Path(sys.executable).parent / "parsl-run"
    run = subprocess.Popen([str(exe), *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    metrics = run_dir / "train" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(training_records(read(metrics) if metrics.exists() else [])) < 2:
            assert run.poll() is None, "parsl-run ended before training got going"
            time.sleep(0.5)
        text = status(run_dir, "--no-verify")
        assert f"run {run_dir} on site 'local': running" in text and re.search(r"│ train +│ running, ", text)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # parsl-run and the training ranks, as a lost job or kill -9
        run.wait()
        for pid in subprocess.run(
            ["pgrep", "-f", str(run_dir)], capture_output=True, text=True
        ).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)  # Parsl's interchange and workers left the process group
    step = max(r["step"] for r in training_records(read(metrics)))
    text = status(run_dir)
    assert f"run {run_dir} on site 'local': interrupted" in text
    assert re.search(r"│ train +│ interrupted, ", text) and f"training: step {step} of 40, loss" in text
    assert re.search(r"│ data +│ (ran|skipped)", text) and re.search(r"│ export +│ pending", text)
    assert "rerun the same command to resume" in text


def test_status_of_a_run_whose_data_stage_failed(tmp_path):
    rejected = tmp_path / "rejected.extxyz"
    rejected.write_text(frame(HYDROGEN, float("nan")))
    run_dir = tmp_path / "run"
    result = parsl_run("workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *WATCHED_RUN,
                       "--set", f"data.sources=[{rejected}]", timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    text = status(run_dir)
    assert f"run {run_dir} on site 'local': failed" in text
    assert re.search(r"│ data +│ failed, ", text) and re.search(r"│ train +│ pending", text)
    assert "data: chunk 1 of 1 done, 0 structures accepted, 1 quarantined" in text
    assert f"stage data failed: EmptyDatasetError: no training structures from {rejected}" in text
    assert "newest checkpoint: none yet" in text


def test_the_cause_of_a_failed_stage_is_one_line():
    """The Parsl error, then the tail of ``train.err`` (`workflows.pretrain`): the line that names why."""
    from workflows.runstate import failure_cause

    killed = """BashExitFailure: bash_app train failed with unix exit code 1
    [0]:
      rank      : 0 (local_rank: 0)
      exitcode  : -9 (pid: 4242)
      traceback : Signal 9 (SIGKILL) received by PID 4242
    ============================================================
    (full log: /run/train/train.err)"""
    assert failure_cause(killed) == "traceback : Signal 9 (SIGKILL) received by PID 4242"
    raised = """BashExitFailure: bash_app train failed with unix exit code 2
    File "/x/janus/train.py", line 120, in __init__
    janus.train: model cutoff 6.0 Å exceeds the data's graph cutoff 5.0 Å
    (full log: /run/train/train.err)"""
    assert failure_cause(raised) == "janus.train: model cutoff 6.0 Å exceeds the data's graph cutoff 5.0 Å"
    one_line = "EmptyDatasetError: no training structures from in.extxyz"
    assert failure_cause(one_line) == one_line
