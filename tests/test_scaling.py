"""Scaling workflow: efficiency arithmetic, SQLite history and verdicts, report, nightly scheduling, and the
ladder on the loopback Slurm cluster with an injected slowdown flagged as a regression."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import parsl_run
from workflows import history, nightly
from workflows.scaling import ScalingConfig, add_efficiency

KEY = history.RunKey(site="test", commit="abc123", preset="tiny", layout="rpn1-g1-e1")


def rung(mode: str, nodes: int, step_time: float, atoms: float) -> history.RungResult:
    return history.RungResult(
        mode=mode,
        nodes=nodes,
        ranks=nodes,
        step_time_median=step_time,
        step_time_spread=0.01,
        atoms_per_s=atoms / step_time,
        per_rank_atoms_per_s=atoms / step_time / nodes,
        flop_efficiency=None,
        comm_fraction=None,
        peak_memory_bytes=2**30,
    )


def ladder(slow_at: int | None = None) -> list[history.RungResult]:
    results = []
    for n in (1, 2, 4):
        slow = 2.0 if n == slow_at else 1.0
        results.append(rung("weak", n, 1.0 * slow, 256 * n))  # ideal weak scaling: same time, N× atoms
        results.append(rung("strong", n, 1.0 / n * slow, 1024))  # ideal strong scaling: time / N
    add_efficiency(results)
    return results


def test_efficiency_definitions():
    results = ladder()
    assert all(r.efficiency == pytest.approx(1.0) for r in results)
    slow = ladder(slow_at=2)
    by_rung = {r.rung: r for r in slow}
    assert by_rung["weak-n2"].efficiency == pytest.approx(0.5)  # per-rank throughput halves
    assert by_rung["strong-n2"].efficiency == pytest.approx(0.5)  # T(1) / (2 · T(2)) with T(2) doubled
    assert by_rung["weak-n4"].efficiency == pytest.approx(1.0)


def test_history_baseline_flags_the_slow_rung_only(tmp_path: Path):
    store = history.History(tmp_path / "history.sqlite")
    first = ladder()
    verdicts = store.judge(KEY, first, window=5, tolerance=0.1)
    assert not any(v.regression for v in verdicts.values())
    assert all("no baseline" in v.reason for v in verdicts.values())
    store.append(KEY, "run1", first, verdicts)
    store.append(KEY, "run2", ladder(), store.judge(KEY, ladder(), 5, 0.1))

    slow = ladder(slow_at=2)
    verdicts = store.judge(KEY, slow, window=5, tolerance=0.1)
    flagged = sorted(name for name, v in verdicts.items() if v.regression)
    assert flagged == ["strong-n2", "weak-n2"]
    assert "efficiency 0.500" in verdicts["weak-n2"].reason
    store.append(KEY, "run3", slow, verdicts)

    # A flagged run is kept in the history but not in the baseline: the next healthy run is judged
    # against the healthy runs.
    assert not any(v.regression for v in store.judge(KEY, ladder(), 5, 0.1).values())
    with sqlite3.connect(tmp_path / "history.sqlite") as db:
        rows = db.execute("SELECT run_id, mode, nodes, regression FROM rungs WHERE regression=1").fetchall()
    assert sorted(rows) == [("run3", "strong", 2, 1), ("run3", "weak", 2, 1)]
    other_site = history.RunKey("elsewhere", "abc123", "tiny", "rpn1-g1-e1")
    assert all("no baseline" in v.reason for v in store.judge(other_site, slow, 5, 0.1).values())


def test_report_has_table_plots_and_verdict(tmp_path: Path):
    store = history.History(tmp_path / "history.sqlite")
    store.append(KEY, "run1", ladder(), store.judge(KEY, ladder(), 5, 0.1))
    slow = ladder(slow_at=4)
    verdicts = store.judge(KEY, slow, 5, 0.1)
    store.append(KEY, "run2", slow, verdicts)
    text = history.write_report(tmp_path / "out", KEY, "run2", slow, verdicts, store.trend(KEY))
    assert "| weak | 4 | 4 |" in text and "**REGRESSION**" in text and "weak-n4" in text
    for name in ("report.md", "efficiency.png", "throughput.png"):
        path = tmp_path / "out" / name
        assert path.stat().st_size > 1000 or name == "report.md"
    assert (tmp_path / "out" / "efficiency.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_config_rejects_bad_ladders():
    with pytest.raises(ValueError, match="ascending"):
        ScalingConfig.model_validate({"scaling": {"nodes": [4, 2]}})
    with pytest.raises(ValueError, match=r"multiple of parallel\.graph"):
        ScalingConfig.model_validate(
            {
                "scaling": {"nodes": [1, 2]},
                "parallel": {"dp": 1, "graph": 2, "expert": 1},
                "launch": {"nodes": 2, "ranks_per_node": 1},
            }
        )
    with pytest.raises(ValueError, match="cron"):
        ScalingConfig.model_validate({"scaling": {"schedule_time": "every night"}})


def _ctx(tmp_path: Path, scheduler: str) -> SimpleNamespace:
    site = SimpleNamespace(
        name="local-slurm", scheduler=scheduler, account="proj1", partition="batch", walltime="00:30:00"
    )
    return SimpleNamespace(
        site=site,
        run=ScalingConfig(),
        run_dir=tmp_path / "nightly",
        workflow_file=Path("workflows/scaling.py"),
        config_file=None,
        assignments=["scaling.nodes=[1,2,4]"],
    )


@pytest.fixture
def crontab(tmp_path: Path):
    """The real crontab, with this user's table saved and restored around the test."""
    if shutil.which("crontab") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("crontab is missing in CI (.ci/run installs Debian's cron)")
        pytest.skip("crontab is not installed (apt-get install cron)")
    saved = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    subprocess.run(["crontab", "-"], input="# someone else's entry\n0 5 * * * true\n", text=True, check=True)
    yield
    if saved.returncode == 0:
        subprocess.run(["crontab", "-"], input=saved.stdout, text=True, check=True)
    else:
        subprocess.run(["crontab", "-r"], capture_output=True)


def test_crontab_entry_appears_once_and_disappears(tmp_path: Path, crontab, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])
    ctx = _ctx(tmp_path, scheduler="pbs")
    assert nightly.mechanism(ctx.site) == "crontab"
    for _ in range(2):  # idempotent
        nightly.apply(ctx, "nightly")
    table = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=True).stdout
    assert table.count(nightly.TAG) == 1
    assert "0 5 * * * true" in table
    entry = [line for line in table.splitlines() if "parsl-run" in line]
    assert len(entry) == 1 and entry[0].startswith("30 2 * * * ")
    assert "--site local-slurm" in entry[0] and "--set 'scaling.nodes=[1,2,4]'" in entry[0]
    for _ in range(2):
        nightly.apply(ctx, "off")
    table = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=True).stdout
    assert nightly.TAG not in table and "0 5 * * * true" in table


def test_scrontab_entry_for_slurm_sites(tmp_path: Path, monkeypatch):
    """Debian's Slurm 22.05 has no scrontab, so this stands in for it (it stores the table it is given,
    like `scrontab FILE` / `scrontab -l`) and the test checks what we would send Slurm."""
    bin_dir, store = tmp_path / "bin", tmp_path / "scrontab.table"
    bin_dir.mkdir()
    stand_in = bin_dir / "scrontab"
    stand_in.write_text(
        f'#!/bin/sh\nif [ "$1" = "-l" ]; then [ -f {store} ] && cat {store} && exit 0; '
        f'echo "no crontab for $USER" >&2; exit 1; fi\ncp "$1" {store}\n'
    )
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    ctx = _ctx(tmp_path, scheduler="slurm")
    assert nightly.mechanism(ctx.site) == "scrontab"
    nightly.apply(ctx, "nightly")
    nightly.apply(ctx, "nightly")
    lines = store.read_text().splitlines()
    assert lines[0].startswith(nightly.TAG) and lines.count(lines[0]) == 1
    assert "#SCRON --account=proj1" in lines and "#SCRON --partition=batch" in lines
    assert "#SCRON --time=00:30:00" in lines
    assert lines[-1].startswith("30 2 * * * cd ")
    nightly.apply(ctx, "off")
    assert store.read_text().strip() == ""


def slurm_available() -> bool:
    up = (
        shutil.which("sinfo")
        and subprocess.run(["bash", "tests/slurm/cluster.sh", "status"], capture_output=True).returncode == 0
    )
    if not up and os.environ.get("CI") == "true":
        pytest.fail("the loopback Slurm cluster is not running in CI (.ci/run starts it)")
    return bool(up)


@pytest.mark.slurm
@pytest.mark.slow
def test_ladder_on_slurm_flags_injected_slowdown(tmp_path: Path):
    if not slurm_available():
        pytest.skip("no loopback Slurm cluster here: bash tests/slurm/cluster.sh start")
    run_dir = tmp_path / "scaling"
    common = [
        "workflows/scaling.py",
        "--site",
        "local-slurm",
        "--run-dir",
        str(run_dir),
        "--set",
        "scaling.nodes=[1,2,4]",
        "--set",
        "scaling.modes=[weak]",
        "--set",
        "scaling.steps=5",
        "--set",
        "scaling.warmup_steps=1",
        "--set",
        "scaling.atoms_per_rank=96",
        "--set",
        "scaling.tolerance=0.5",
        "--set",
        "data.sources=[sample_data/crystals_pbe.extxyz.gz]",
    ]
    first = parsl_run(*common, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    results = run_dir / "results"
    for name in ("report.md", "efficiency.png", "throughput.png", "history.sqlite"):
        assert (results / name).exists(), name
    report = (results / "report.md").read_text()
    for nodes in (1, 2, 4):
        assert f"| weak | {nodes} | {nodes} |" in report
    assert "no regression" in report

    time.sleep(1)  # run ids are per second
    # Four ranks share two cores here, so rungs are noisy (a loaded machine has flagged the base rung
    # too): the injected delay, several times even a slow step, and the 50 % tolerance keep the verdict
    # about the delay. Only the injected rung is required to be flagged.
    # The two-node rung is judged against its own history; the four-node rung is left out of this ladder
    # (four ranks on two cores is its slowest part).
    slow = parsl_run(
        *common, "--set", "scaling.nodes=[1,2]", "--set", "scaling.inject_sleep_s=10.0",
        "--set", "scaling.inject_nodes=2", timeout=900,
    )  # fmt: skip
    assert slow.returncode == 3, slow.stdout + slow.stderr
    assert "REGRESSION in rung weak-n2" in slow.stdout
    with sqlite3.connect(results / "history.sqlite") as db:
        runs = db.execute("SELECT COUNT(DISTINCT run_id) FROM rungs").fetchone()[0]
    assert runs == 2
    for nodes in (1, 2, 4):  # every rung ran on as many ranks as it asked for
        (metrics,) = sorted(run_dir.glob(f"runs/*/weak-n{nodes}/metrics.jsonl"))[-1:]
        assert {json.loads(line)["world_size"] for line in metrics.read_text().splitlines()} == {nodes}
