"""Watching a run that did not finish: `parsl-run status` on a run killed in training and on a run whose
data stage failed. The live progress, `status` of a finished run and Parsl's monitoring database are read
from the shared finished run in `tests/test_pretrain.py`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from janus.metrics import read, training_records
from tests.conftest import ROOT, SMALL_RUN, parsl_run, status
from tests.test_hostile_data import HYDROGEN, frame

pytestmark = pytest.mark.slow

# SMALL_RUN without MD: these runs never reach the evaluation.
WATCHED_RUN = [*SMALL_RUN, "--set", "eval.md_steps=0"]


def test_status_of_a_run_killed_in_training(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run[0] / "data", run_dir / "data")  # prepared already: the chunks are reused
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
