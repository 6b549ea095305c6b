"""`parsl-run` fails fast, before Parsl starts, on every kind of bad input, naming the problem."""

from __future__ import annotations

from pathlib import Path

import parsl
import pytest

from tests.conftest import ROOT, parsl_run
from workflows.cli import main

WORKFLOW = "workflows/pretrain.py"


def test_help_lists_options():
    result = parsl_run("--help")
    assert result.returncode == 0
    for option in ("--site", "--config", "--run-dir", "--set", "--dry-run", "--list-sites"):
        assert option in result.stdout


def test_list_sites_includes_local():
    result = parsl_run("--list-sites")
    assert result.returncode == 0
    assert result.stdout.split()[0] == "local" or "\nlocal " in "\n" + result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--site", "nowhere"], ["unknown site 'nowhere'", "local"]),
        (["--site", "local", "--set", "train.stepz=3"], ["unknown key 'stepz'", "steps"]),
        (["--site", "local", "--set", "bogus.key=1"], ["unknown key 'bogus'", "train"]),
        (["--site", "local", "--set", "train.steps=-4"], ["train.steps", "greater than or equal to 1"]),
        (["--site", "local", "--set", "train.steps=many"], ["train.steps", "many"]),
        (["--site", "local", "--set", "model.preset=huge"], ["unknown model preset 'huge'", "tiny", "moe-s"]),
        (
            ["--site", "local", "--set", "parallel.dp=2"],
            ["parallel.dp", "launch.nodes × launch.ranks_per_node"],
        ),
        (["--site", "local", "--set", "data.sources=[/no/such.xyz]"], ["data.sources", "/no/such.xyz"]),
        (["--site", "local", "--set", "site.account=x;rm -rf /"], ["account", "may only hold"]),
        (["--site", "local", "--set", "train.steps"], ["expected key.path=value"]),
    ],
)
def test_bad_input_fails_before_parsl(tmp_path: Path, capsys, args: list[str], expected: list[str]):
    status = main([str(ROOT / WORKFLOW), *args, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2, err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "run").exists(), "nothing may be created before the config validates"
    with pytest.raises(parsl.errors.NoDataFlowKernelError):
        parsl.dfk()  # Parsl was never started


def test_missing_config_file(tmp_path: Path):
    result = parsl_run(WORKFLOW, "--site", "local", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml does not exist" in result.stderr


def test_config_file_values_are_validated(tmp_path: Path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  steps: 5\n  lr: -1\n")
    result = parsl_run(WORKFLOW, "--site", "local", "--config", str(config))
    assert result.returncode == 2
    assert "train.lr" in result.stderr


def test_dry_run_prints_dag_and_runs_nothing(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = parsl_run(
        WORKFLOW, "--site", "local", "--run-dir", str(run_dir), "--dry-run", "--set", "train.steps=7"
    )
    assert result.returncode == 0, result.stderr
    for stage in ("data", "train", "export", "evaluate"):
        assert stage in result.stdout
    assert "torch.distributed.run" in result.stdout and "janus.train" in result.stdout
    assert "7 steps" in result.stdout
    assert not run_dir.exists()
