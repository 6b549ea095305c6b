"""The pretrain workflow through a real Slurm scheduler: the loopback cluster of tests/slurm/ (four nodes on
this machine), with ``sbatch`` blocks, training as one ``srun`` step over 2 nodes × 1 rank with gloo, and
``sacct`` telling where each step ran.

Skips when the Slurm client is missing or the cluster is down (start it: ``sudo tests/slurm/cluster.sh
start``), except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from janus.metrics import read, training_records
from tests.conftest import ROOT, SMALL_RUN, parsl_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ["--set", "launch.nodes=2", "--set", "launch.ranks_per_node=1", "--set", "parallel.dp=2"]
FINAL = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return "the Slurm client (sinfo, sacct) is not installed"
    status = subprocess.run(["bash", str(ROOT / "tests/slurm/cluster.sh"), "status"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    if status.returncode != 0:
        return f"the loopback Slurm cluster is down (sudo tests/slurm/cluster.sh start):\n{status.stdout}"
    accounting = subprocess.run(["sacct", "-X", "-n", "-j", "1"], capture_output=True, text=True, timeout=60)
    if accounting.returncode != 0:
        return f"sacct does not work (slurmdbd accounting needed): {accounting.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {problem}")
    if problem:
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def no_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def sacct_rows(*args: str) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "NodeList", "NNodes", "NTasks", "State"]
    out = subprocess.run(["sacct", "-n", "-P", "-o", ",".join(fields), *args], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def block_steps(run_dir: Path, executor: str, timeout: float = 90) -> list[dict[str, str]]:
    """The rows of the first block job of ``executor``, once sacct's record is final: for a few seconds
    after a job ends sacct holds a placeholder (JobName 'allocation', only the first node;
    tests/slurm/README.md), so poll until the job carries the name Parsl gave it and a final state."""
    scripts = run_dir / "runinfo" / "000" / "submit_scripts"
    name = next(p.name for p in sorted(scripts.iterdir()) if p.name.startswith(f"parsl.{executor}.block-0.")
                and p.suffix not in (".stdout", ".stderr"))  # fmt: skip
    deadline = time.time() + timeout
    while True:
        jobs = sacct_rows("-X", "--name", name)
        if jobs and jobs[0]["JobName"] == name and jobs[0]["State"].split()[0] in FINAL:
            return sacct_rows("-j", jobs[0]["JobID"])
        assert time.time() < deadline, f"no final sacct record for {name}: {jobs}"
        time.sleep(0.5)


def hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def metrics_steps(run_dir: Path) -> list[int]:
    """Steps of the training lines (validation lines left out)."""
    return [r["step"] for r in training_records(read(run_dir / "train" / "metrics.jsonl"))]


def test_pretrain_trains_on_two_slurm_nodes(slurm_cluster: None, finished_run, tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run[0] / "data", run_dir / "data")  # prepared already: the chunks are reused
    # SMALL_RUN, cut to 6 steps: this test is about where the ranks run, and keeps under ~3 minutes.
    result = parsl_run("workflows/pretrain.py", "--site", "local-slurm", "--run-dir", str(run_dir),
                       *SMALL_RUN, *TWO_NODES, "--set", "train.steps=6", "--set", "train.checkpoint_every=3",
                       timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "eval" / "metrics.json").is_file()
    assert metrics_steps(run_dir) == list(range(1, 7))
    lines = training_records(read(run_dir / "train" / "metrics.jsonl"))
    # the site's environment reached the srun-launched ranks: one OpenMP thread each on shared cores
    assert {line["torch_threads"] for line in lines} == {1}

    rows = block_steps(run_dir, "train")
    job, steps = rows[0], rows[1:]
    training = [s for s in steps if s["JobName"] == "python"]  # the srun step of janus.train
    assert len(training) == 1, steps
    step = training[0]
    assert step["State"] == "COMPLETED" and step["NNodes"] == "2" and step["NTasks"] == "2"
    nodes = hostnames(step["NodeList"])
    assert len(set(nodes)) == 2 and set(nodes) <= set(hostnames(job["NodeList"]))
    stage_job = block_steps(run_dir, "stages")[0]
    assert stage_job["NNodes"] == "1"


def test_rank_killed_mid_training_is_retried_and_resumes(slurm_cluster: None, finished_run, tmp_path: Path):
    """A rank dies as if its node failed: srun exits non-zero, Parsl retries the task in the same block
    (site retries=1), and janus.train resumes from its newest checkpoint."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run[0] / "data", run_dir / "data")
    args = ["workflows/pretrain.py", "--site", "local-slurm", "--run-dir", str(run_dir), *SMALL_RUN,
            *TWO_NODES, "--set", "train.steps=16", "--set", "train.sleep_per_step_s=0.5"]  # fmt: skip
    exe = Path(sys.executable).parent / "parsl-run"
    run = subprocess.Popen(
        [str(exe), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 420
        while max(metrics_steps(run_dir), default=0) < 6:
            assert run.poll() is None and time.time() < deadline, "training never passed its first checkpoint"
            time.sleep(0.2)
        os.kill(int((run_dir / "train" / "ranks" / "rank1.pid").read_text()), signal.SIGKILL)
        output, _ = run.communicate(timeout=420)
    finally:
        run.kill()
    assert run.returncode == 0, output
    steps = metrics_steps(run_dir)
    assert steps[-1] == 16 and set(steps) == set(range(1, 17))
    assert "resumed from" in (run_dir / "train" / "train.log").read_text()
    training = [s for s in block_steps(run_dir, "train")[1:] if s["JobName"] == "python"]
    assert len(training) == 2 and training[0]["State"] != "COMPLETED" and training[1]["State"] == "COMPLETED"
