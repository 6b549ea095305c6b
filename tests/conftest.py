"""Shared fixtures: the project root, a small run config, and a helper that runs `parsl-run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A run small enough for CI: the bundled sample, a tiny model, a few steps.
SMALL_RUN = [
    "--set", "train.steps=12",
    "--set", "train.checkpoint_every=4",
    "--set", "train.warmup_steps=2",
    "--set", "train.max_atoms_per_batch=256",
    "--set", "eval.max_structures_per_task=8",
    "--set", "eval.md_steps=20",
]  # fmt: skip

# SMALL_RUN as the one finished run the tests read: validation at steps 6 and 12, Parsl monitoring on.
FINISHED_RUN = [*SMALL_RUN, "--set", "train.eval_every=6", "--set", "site.monitoring=true"]


def read_frames(path: Path, index: str = ":") -> list:
    """``ase.io.read`` of an extxyz file, decompressed in memory first: ASE seeks in a gzip stream to
    index its frames, which reads the 2,000-crystal sample file in 55 s instead of 2."""
    import gzip
    import io

    import ase.io

    data = Path(path).read_bytes()
    text = gzip.decompress(data).decode() if data[:2] == b"\x1f\x8b" else data.decode()
    return ase.io.read(io.StringIO(text), index, format="extxyz")


def parsl_run(*args: str, cwd: Path = ROOT, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run the installed ``parsl-run`` console script (the command users type), by its path and with its
    venv off ``PATH``, as from an unactivated venv or cron."""
    bindir = Path(sys.executable).parent
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != bindir]
    return subprocess.run(
        [str(bindir / "parsl-run"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": os.pathsep.join(path)},
        **popen,
    )


def status(run_dir: Path, *args: str) -> str:
    """``parsl-run status RUN_DIR``'s output, whitespace collapsed (rich may wrap a table cell)."""
    result = parsl_run("status", str(run_dir), *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return " ".join(result.stdout.split())


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, str]:
    """One ``FINISHED_RUN`` to its end, with its console output (not a terminal: plain). The tests that
    read a finished run share it (an end-to-end run costs about 50 s); `tests/test_pretrain.py` reruns it
    in its last test, after every reader."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = parsl_run("workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir), *FINISHED_RUN)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


@pytest.fixture
def root() -> Path:
    return ROOT


COMPILE_SETTING = os.environ.get("MATRIS_COMPILE")  # the one this process imported `matris.fused` with


@pytest.fixture(scope="session", autouse=True)
def plain_ops_in_subprocesses():
    """Processes the tests start train with plain ops (``MATRIS_COMPILE=0``), from the session's first
    fixture on (module and session fixtures that train included): each would otherwise spend 10-50 s
    compiling `matris.fused`'s kernels, which doubled test_janus.py's time (8 min 0 s against 4 min 4 s).
    The kernels stay tested where they are the subject: in process in test_matris, under FSDP on two
    ranks in test_janus (tests marked ``compiled``), and end to end in the CI main job."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MATRIS_COMPILE", "0")
        yield


@pytest.fixture(autouse=True)
def kernel_choice_restored():
    """A trainer chooses the kernels for its whole process (`matris.fused.select_kernels`): after a test
    that ran one in this process, the next starts from this process's own choice again."""
    from matris import cpu_kernels, fused

    saved = fused._Compiled.enabled, cpu_kernels._State.enabled
    yield
    fused._Compiled.enabled, cpu_kernels._State.enabled = saved


@pytest.fixture(autouse=True)
def compiled_ops_where_marked(request, monkeypatch):
    """A test marked ``compiled`` starts its processes with this process's own setting."""
    if request.node.get_closest_marker("compiled") is not None:
        if COMPILE_SETTING is None:
            monkeypatch.delenv("MATRIS_COMPILE")
        else:
            monkeypatch.setenv("MATRIS_COMPILE", COMPILE_SETTING)
