"""Hostile but fair input to `parsl-run`: every path and string a user gives is data, never shell; a bad
or changed config fails before anything is submitted, naming the field; one run per run directory.

The table of hostile strings goes through the dry run of every site (in process, fast) and the local
site's real command (`parsl-run` as users type it); none may run a command, and each is either carried
safely or refused with a message naming the field.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import site_configs
from tests.conftest import ROOT, parsl_run
from workflows import cli, nightly
from workflows.rundir import RunPaths, exclusive
from workflows.scaling import ScalingConfig

WORKFLOW = str(ROOT / "workflows" / "pretrain.py")
ACCOUNTS = {"frontier": "ABC123", "lumi": "project_465000123", "aurora": "MatRIS", "polaris": "MatRIS"}
CANARY = "pwned"

# (what the user types, the field the refusal must name; None: carried safely, the run may go ahead)
HOSTILE_RUN_DIRS = [
    (f"rd_$(touch {CANARY})", "--run-dir"),
    (f"rd_`touch {CANARY}`", "--run-dir"),
    (f"rd;touch {CANARY}", "--run-dir"),
    ("rd with space", "--run-dir"),
    ("rd'quote", "--run-dir"),
    ('rd"dquote', "--run-dir"),
    ("rd\nnewline", "--run-dir"),
    ("rd_ünïcode", "--run-dir"),
    ("rd_" + "x" * 200, None),
]
HOSTILE_SETTINGS = [
    (f"site.account=abc;touch {CANARY}", "site.account"),
    (f"site.partition=$(touch {CANARY})", "site.partition"),
    (f"model.preset=tiny`touch {CANARY}`", "model.preset"),
    (f"train.steps=1;touch {CANARY}", "train.steps"),
    (f"data.sources=['x;touch {CANARY}.xyz']", "data.sources"),
    ("train.lr=1e-3\ntrain.seed=3", "train.lr"),
]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in the test's directory (relative run dirs land there; a canary file would show there) with
    no per-user site file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def canaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"*{CANARY}*")]


@pytest.mark.parametrize("site", site_configs.available_sites())
def test_hostile_strings_through_every_sites_dry_run(site: str, tmp_path: Path):
    account = ["--set", f"site.account={ACCOUNTS[site]}"] if site in ACCOUNTS else []
    for run_dir, field in HOSTILE_RUN_DIRS:
        code, out, err = run_cli(WORKFLOW, "--site", site, "--run-dir", run_dir, "--dry-run", *account)
        if field is None:
            assert code == 0, err
            assert run_dir in out
        else:
            assert code == 2 and field in err, (run_dir, err)
    for setting, field in HOSTILE_SETTINGS:
        code, _, err = run_cli(WORKFLOW, "--site", site, "--dry-run", *account, "--set", setting)
        assert code == 2 and field in err, (site, setting, err)
    assert canaries(tmp_path) == []


def test_hostile_run_dirs_through_the_local_sites_real_command(tmp_path: Path):
    """The real `parsl-run` (not a dry run): refused at once, nothing created, no command run."""
    for run_dir, field in HOSTILE_RUN_DIRS:
        if field is None:
            continue
        result = parsl_run(WORKFLOW, "--site", "local", "--run-dir", run_dir, cwd=tmp_path, timeout=60)
        assert result.returncode == 2 and field in result.stderr, (run_dir, result.stderr)
    assert canaries(tmp_path) == [] and not (tmp_path / "rd with space").exists()


def test_trainer_checks_fail_before_parsl_starts_and_short_runs_need_no_warmup_key(tmp_path: Path):
    code, _, err = run_cli(WORKFLOW, "--site", "local", "--dry-run", "--set", "train.steps=3")
    assert code == 0, err
    for settings, words in [
        (["train.steps=3", "train.warmup_steps=5"], ["train.warmup_steps (5) must be below train.steps (3)"]),
        (["parallel.expert=3", "launch.ranks_per_node=3"], ["parallel.expert = 3", "4 experts"]),
        (["parallel.expert=2", "launch.ranks_per_node=2", "model.preset=matris-6l"], ["no MoE layers"]),
        (["model.overrides={dim: 30}"], ["model.overrides", "divisible"]),
    ]:
        args = [a for s in settings for a in ("--set", s)]
        code, _, err = run_cli(WORKFLOW, "--site", "local", "--run-dir", "r", *args)
        assert code == 2 and all(w in err for w in words), (settings, err)
        assert not (tmp_path / "r").exists()

    from janus.config import TrainConfig
    from janus.train import lr_lambda

    assert TrainConfig(steps=3).warmup == 0 and TrainConfig(steps=50).warmup == 5
    assert TrainConfig().warmup == 10 and TrainConfig(steps=40, warmup_steps=7).warmup == 7
    schedule = lr_lambda(SimpleNamespace(train=TrainConfig(steps=3, min_lr_ratio=0.1)))
    assert schedule(0) == 1.0 and schedule(2) == pytest.approx(0.325)


def test_a_held_run_dir_is_refused(tmp_path: Path):
    paths = RunPaths(tmp_path / "run")
    with exclusive(paths):
        args = (WORKFLOW, "--site", "local", "--run-dir", str(paths.root))
        result = parsl_run(*args, cwd=tmp_path, timeout=60)
        with pytest.raises(cli.ConfigError, match="in use by parsl-run pid"), exclusive(paths):
            pass
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"is in use by parsl-run pid \d+", result.stderr), result.stderr
    assert not (paths.root / "data").exists()
    with exclusive(paths):  # released: the next run takes it
        pass


def test_nightly_table_escapes_percent_for_cron_and_refuses_it_for_scrontab(tmp_path: Path):
    site = SimpleNamespace(name="local-slurm", account=None, partition=None, walltime="00:30:00")
    ctx = SimpleNamespace(
        site=site, run=ScalingConfig(), run_dir=tmp_path / "nightly_50%", workflow_file=Path("w.py"),
        config_file=None, assignments=["site.worker_init=echo %H"],
    )  # fmt: skip
    (line,) = [x for x in nightly.block(ctx, "crontab") if "parsl-run" in x]
    command = line.split(" ", 5)[5]
    assert "%" not in re.sub(r"\\%", "", command)
    # cron hands the shell the line with each \% made a %: the shell then sees the user's own strings
    words = _argv(command.replace("\\%", "%"))
    assert str(tmp_path / "nightly_50%") in words and "site.worker_init=echo %H" in words
    with pytest.raises(RuntimeError, match="'%'"):
        nightly.block(ctx, "scrontab")


def _argv(command: str) -> list[str]:
    """The words of the ``parsl-run ...`` part of a nightly command line, as the shell splits them."""
    import shlex

    return shlex.split(command.split(" && ", 1)[1].split(" >> ", 1)[0])


def test_a_lock_left_to_a_child_of_a_dead_run_is_explained(tmp_path: Path):
    """A process forked by a killed `parsl-run` keeps its lock: the refusal says so and how to find it."""
    import os
    import signal
    import sys

    child = tmp_path / "child.pid"
    code = (
        "import os, time\n"
        "from pathlib import Path\n"
        "from workflows.rundir import RunPaths, exclusive\n"
        f"with exclusive(RunPaths(Path({str(tmp_path / 'run')!r}))):\n"
        "    if os.fork() == 0:\n"
        f"        Path({str(child)!r}).write_text(str(os.getpid()))\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    while not child.exists() or not child.read_text():
        pass
    try:
        with pytest.raises(cli.ConfigError, match=r"that process has ended; .*fuser -v"), exclusive(
            RunPaths(tmp_path / "run")
        ):
            pass
    finally:
        os.kill(int(child.read_text()), signal.SIGKILL)


def test_an_unreadable_parsl_memo_checkpoint_is_set_aside_and_named(tmp_path: Path):
    """Parsl refuses to start on a damaged ``tasks.pkl`` (BadCheckpoint); the run sets it aside, says so,
    and leaves readable ones where Parsl finds them."""
    import pickle

    from workflows.rundir import set_aside_unreadable_memos

    good, bad = (tmp_path / "run" / "runinfo" / n / "checkpoint" / "tasks.pkl" for n in ("000", "001"))
    for memo in (good, bad):
        memo.parent.mkdir(parents=True)
        memo.write_bytes(pickle.dumps({"hash": "h", "exception": None, "result": 1}))
    bad.write_bytes(bad.read_bytes()[:-3] + b"\xff\xff\xff")
    lines = set_aside_unreadable_memos(RunPaths(tmp_path / "run"))
    assert lines == [f"Parsl's memo checkpoint {bad} is unreadable (UnpicklingError); set aside"]
    assert good.exists() and not bad.exists() and (bad.parent.with_name("checkpoint.corrupt")).is_dir()
    assert set_aside_unreadable_memos(RunPaths(tmp_path / "run")) == []
