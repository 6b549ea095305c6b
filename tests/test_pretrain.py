"""The pretrain DAG on the local site, end to end: its outputs, the live progress, `parsl-run status` of
the finished run and Parsl's monitoring database, resume after the training ranks are SIGKILLed, and a
rerun of the finished run."""

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
from tests.conftest import FINISHED_RUN, ROOT, SMALL_RUN, parsl_run, status
from workflows.rundir import RunPaths

pytestmark = pytest.mark.slow


def metrics_steps(run_dir: Path) -> list[int]:
    """Steps of the training lines (validation lines left out)."""
    return [r["step"] for r in training_records(read(run_dir / "train" / "metrics.jsonl"))]


def shard_mtimes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "data" / "shards").glob("*.h5")}


def test_pretrain_end_to_end_writes_every_output(finished_run, tmp_path: Path):
    run_dir, output = finished_run

    for path in ("data/manifest.json", "data/quarantine.jsonl", "train/metrics.jsonl",
                 "export/model.safetensors", "eval/metrics.json", "summary.json", "runinfo"):  # fmt: skip
        assert (run_dir / path).exists(), path
    assert metrics_steps(run_dir) == list(range(1, 13))

    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == set(manifest["tasks"]) and len(manifest["tasks"]) == 4
    for task, values in metrics["tasks"].items():
        assert values["n_structures"] > 0, task
        for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_a"):
            assert values[key] == pytest.approx(values[key]) and values[key] >= 0, (task, key)
        if task != "molecule-gfn2":
            assert values["stress_mae_mev_per_a3"] is not None and values["stress_mae_mev_per_a3"] >= 0
    assert "held-out errors" in output and "crystal-pbe" in output
    # MD stability: one NVE run per periodic task and one molecule, each with a verdict.
    md_tasks = {line["task"] for line in metrics["md"]}
    assert md_tasks == set(manifest["tasks"]), md_tasks
    assert all(isinstance(line["stable"], bool) and line["steps"] > 0 for line in metrics["md"])
    assert metrics["fd_check"] and (run_dir / "eval" / "parity.png").exists()
    assert (run_dir / "eval" / "training.png").exists()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == dict.fromkeys(
        ("data", "train", "export", "evaluate"), "ran"
    )

    # The exported model loads and reproduces the evaluation in a process without janus or parsl.
    check = (
        "import json, sys, matris, numpy as np\n"
        "from evaluation.evaluate import evaluate_model\n"
        f"m = evaluate_model('{run_dir}/export/model.safetensors', '{run_dir}/data', '{tmp_path}/again', 8,\n"
        "                   md_steps=0, fd_structures=0, plots=False)\n"
        "assert 'janus' not in sys.modules and 'parsl' not in sys.modules, sorted(sys.modules)\n"
        f"old = json.load(open('{run_dir}/eval/metrics.json'))\n"
        "for t in old['tasks']:\n"
        "    key = 'energy_mae_mev_per_atom'\n"
        "    assert np.isclose(old['tasks'][t][key], m['tasks'][t][key])\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=tmp_path)


def test_plain_progress_names_each_stage_and_reaches_the_last_step(finished_run):
    _, output = finished_run
    lines = output.splitlines()
    for stage in ("data", "train", "export", "evaluate"):
        assert f"parsl-run: {stage}: running" in lines, stage
        assert any(line.startswith(f"parsl-run: {stage}: ran, ") for line in lines), stage
    chunks = [line for line in lines if line.startswith("parsl-run: data: chunk ")]
    assert re.fullmatch(r"parsl-run: data: chunk (\d+) of \1 done, 4,104 structures accepted, 0 quarantined",
                        chunks[-1]), chunks  # fmt: skip
    steps = [line for line in lines if line.startswith("parsl-run: train: step ")]
    assert steps[-1].startswith("parsl-run: train: step 12 of 12, loss "), steps
    assert "atoms/s" in steps[-1] and all("ETA" in line for line in steps[:-1])
    assert [line.split(" (")[0] for line in lines if line.startswith("janus: validation")] == [
        "janus: validation at step 6", "janus: validation at step 12"]  # fmt: skip
    order = [lines.index(f"parsl-run: {stage}: running") for stage in ("data", "train", "export", "evaluate")]
    assert order == sorted(order) and lines.index(steps[-1]) < order[2]
    assert "\x1b[" not in output, "no terminal control codes in plain mode"


def test_status_of_a_finished_run(finished_run, tmp_path):
    run_dir, _ = finished_run
    text = status(run_dir, "--plot", str(run_dir / "now.png"))
    assert f"run {run_dir} on site 'local': finished" in text
    for stage in ("data", "train", "export", "evaluate"):
        assert re.search(rf"│ {stage} +│ ran, ", text), stage
    assert "step 12 of 12, loss" in text and "atoms/s" in text
    assert "validation at step 12" in text and "crystal-pbe" in text and "molecule-gfn2" in text
    assert f"newest checkpoint: {run_dir}/train/checkpoints/step_000000012 (verified)" in text
    assert re.search(r"Parsl jobs \(executor block: job id\): stages block 0: \d+", text)
    assert f"{run_dir}/runinfo/000/parsl.log" in text and f"{run_dir}/train/train.err" in text
    assert "held-out errors" in text
    assert (run_dir / "now.png").read_bytes()[:4] == b"\x89PNG"
    moved = tmp_path / "elsewhere"  # as a run dir mounted at another path, or copied from another site
    shutil.copytree(run_dir, moved)
    text = status(moved, "--no-verify")
    assert f"run {moved} on site 'local': finished" in text and f"{moved}/runinfo/000/parsl.log" in text
    assert f"{moved}/train/checkpoints/step_000000012 (not verified)" in text


def test_monitoring_records_the_run_tasks(finished_run):
    run_dir, _ = finished_run
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


def test_killed_training_resumes_without_redoing_data(finished_run, tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run[0] / "data", run_dir / "data")  # prepared already: the chunks are reused
    args = [
        "workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *SMALL_RUN,
        "--set", "train.steps=16", "--set", "train.sleep_per_step_s=0.3",
    ]  # fmt: skip
    exe = Path(sys.executable).parent / "parsl-run"
    first = subprocess.Popen(
        [str(exe), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and max(metrics_steps(run_dir), default=0) < 10:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    assert max(metrics_steps(run_dir)) >= 10, "training never got past the second checkpoint"
    data_before = shard_mtimes(run_dir)
    pids = [int(p.read_text()) for p in (run_dir / "train" / "ranks").glob("rank*.pid")]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    output, _ = first.communicate(timeout=120)
    assert first.returncode != 0, output
    assert "stage 'train' failed" in output
    killed_at = max(metrics_steps(run_dir))
    assert killed_at < 16

    second = parsl_run(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    steps = metrics_steps(run_dir)
    assert steps == list(range(1, 17)), "one metrics line per step, ending at the configured step count"
    log = (run_dir / "train" / "train.log").read_text()
    assert "resumed from" in log and "step_000000008" in log
    assert shard_mtimes(run_dir) == data_before, "data preparation was redone"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["data"]["status"].startswith("skipped")
    assert summary["stages"]["train"]["status"] == "ran"


def test_rerun_skips_every_stage_and_a_changed_config_is_refused(finished_run):
    """Last in this file: it reruns the shared finished run, which the tests above read as it ended."""
    run_dir, _ = finished_run
    again = parsl_run("workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *FINISHED_RUN)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, stage in summary["stages"].items():
        assert stage["status"].startswith("skipped"), (name, stage)
    assert metrics_steps(run_dir) == list(range(1, 13))

    # A changed config on the finished run dir is refused before anything runs, naming the fields.
    before = (run_dir / "run_config.yaml").read_bytes()
    changed = (*FINISHED_RUN, "--set", "train.lr=0.05", "--set", "train.seed=3")
    refused = parsl_run("workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *changed)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "train.lr: 0.004 → 0.05" in refused.stderr and "train.seed: 0 → 3" in refused.stderr
    assert (run_dir / "run_config.yaml").read_bytes() == before
