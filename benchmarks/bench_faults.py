"""Fault injection on the real pipeline: kill -9 at random moments, corrupted artifacts, then a rerun.

    python benchmarks/bench_faults.py [--kills 20] [--seed 0] [--window FROM TO] [--out runs/bench_faults]
        [--no-corruption]

A small run (`parsl-run workflows/pretrain.py --site local`: 300 crystals and 150 molecules of the bundled
sample, 12 steps, a checkpoint every 4) is first run once uninterrupted: the reference shards (bytes), loss
curve and wall time. Then:

- **kills**: each trial starts the same command in a fresh run directory, sends SIGKILL to its whole
  process group (parsl-run, Parsl's workers, torchrun and its ranks: what a node failure or ``scancel``
  does) after a random delay within the reference wall time, and reruns the command to completion. It
  checks the rerun's exit status, that the shards are byte-identical to the reference, that the loss curve
  equals the reference's (relative 1e-4; float32), and how many training steps were done twice (logged
  before the kill, after the checkpoint the rerun resumed from): at most ``train.checkpoint_every``.
- **corruption**: a copy of the finished reference run has one artifact damaged (a flipped byte in a
  shard, the manifest, a checkpoint's ``.distcp`` and ``.metadata``, the model file, Parsl's memo
  checkpoint), then the command is rerun: was the damage detected, was the damaged file named, did the run
  end with verified outputs?

Prints one table per part and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_EVERY = 4
SETTINGS = [
    "train.steps=12", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.max_atoms_per_batch=256",
    "train.eval_every=6", "train.eval_max_structures=8", "eval.max_structures_per_task=8", "eval.md_steps=20",
]  # fmt: skip


def parsl_run_command(run_dir: Path, sources: list[Path]) -> list[str]:
    parsl_run = str(Path(sys.executable).parent / "parsl-run")
    sets = [f"data.sources=[{','.join(str(s) for s in sources)}]", *SETTINGS]
    return [parsl_run, "workflows/pretrain.py", "--site", "local", "--run-dir", str(run_dir),
            *(a for s in sets for a in ("--set", s))]  # fmt: skip


def small_inputs(out: Path) -> list[Path]:
    """300 crystals and 150 molecules of the bundled sample, as plain extxyz."""
    import ase.io

    sys.path.insert(0, str(ROOT))
    from tests.conftest import read_frames

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, count in (("crystals_pbe", 300), ("molecules_gfn2", 150)):
        path = out / f"{name}.extxyz"
        if not path.exists():
            ase.io.write(path, read_frames(ROOT / "sample_data" / f"{name}.extxyz.gz", f":{count}"))
        files.append(path)
    return files


def run(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def shard_digests(run_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / "data" / "shards").glob("*"))
        if p.is_file()
    }


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "train" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") != "validation"}


def stage_at_kill(run_dir: Path) -> str:
    """Which stage the kill hit, from the outputs present."""
    if not (run_dir / "data" / "manifest.json").exists():
        return "data"
    done = sorted((run_dir / "train" / "checkpoints").glob("step_000000012"))
    if not done:
        return "train"
    if not (run_dir / "export" / "model.safetensors").exists():
        return "export"
    if not (run_dir / "eval" / "metrics.json").exists():
        return "evaluate"
    return "after"


def kill_trial(k: int, delay: float, out: Path, sources: list[Path], ref: dict[str, Any]) -> dict[str, Any]:
    run_dir = out / f"kill_{k:02d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = parsl_run_command(run_dir, sources)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    time.sleep(delay)
    with_logged = losses(run_dir) if (run_dir / "train" / "metrics.jsonl").exists() else {}
    stage = stage_at_kill(run_dir)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_stragglers(run_dir)
    logged = max(with_logged, default=0)
    tic = time.perf_counter()
    rerun = run(cmd)
    seconds = time.perf_counter() - tic
    resumed = _resumed_step(run_dir)
    trained_again = _stage_status(run_dir, "train") == "ran"
    got = losses(run_dir) if rerun.returncode == 0 else {}
    same_curve = bool(got) and got.keys() == ref["losses"].keys() and all(
        abs(got[s] - ref["losses"][s]) <= 1e-4 * abs(ref["losses"][s]) for s in got
    )
    return {
        "trial": k,
        "kill_after_s": round(delay, 1),
        "stage": stage,
        "rerun_rc": rerun.returncode,
        "rerun_s": round(seconds, 1),
        "same_shards": rerun.returncode == 0 and shard_digests(run_dir) == ref["shards"],
        "same_losses": same_curve,
        "steps_redone": 0 if not trained_again else max(0, logged - (resumed or 0)),
        "error": "" if rerun.returncode == 0 else (rerun.stderr or rerun.stdout)[-400:],
    }


def _resumed_step(run_dir: Path) -> int | None:
    """The step the last training process resumed from (its log is appended to by every attempt)."""
    log = run_dir / "train" / "train.log"
    text = log.read_text() if log.exists() else ""
    found = [line for line in text.splitlines() if "resumed from" in line]
    return int(found[-1].split("step_")[1][:9]) if found and "step_" in found[-1] else None


def _stage_status(run_dir: Path, stage: str) -> str:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text())["stages"][stage]["status"] if summary.exists() else ""


def _kill_stragglers(run_dir: Path) -> None:
    """Processes of the killed run that left its process group (Parsl's interchange and worker pool)."""
    found = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def corruption_cases(run_dir: Path) -> dict[str, Path]:
    checkpoints = sorted(p for p in (run_dir / "train" / "checkpoints").iterdir() if p.is_dir())
    newest = checkpoints[-1]
    return {
        "shard": next(p for p in sorted((run_dir / "data" / "shards").glob("*")) if p.is_file()),
        "manifest": run_dir / "data" / "manifest.json",
        "checkpoint .distcp": next(iter(sorted(newest.glob("*.distcp")))),
        "checkpoint .metadata": newest / ".metadata",
        "model file": run_dir / "export" / "model.safetensors",
        "Parsl memo checkpoint": next(iter(sorted((run_dir / "runinfo").glob("*/checkpoint/tasks.pkl")))),
    }


def corruption_trial(kind: str, reference_dir: Path, out: Path, sources: list[Path]) -> dict[str, Any]:
    run_dir = out / f"corrupt_{kind.replace(' ', '_').replace('.', '')}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(reference_dir, run_dir)
    cmd = parsl_run_command(run_dir, sources)
    victim = corruption_cases(run_dir)[kind]
    flip_byte(victim)
    rerun = run(cmd)
    text = rerun.stdout + rerun.stderr
    for log in (run_dir / "train" / "train.log", run_dir / "train" / "train.err"):
        text += log.read_text() if log.exists() else ""
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    statuses = {name: s["status"] for name, s in summary.get("stages", {}).items()}
    return {
        "artifact": kind,
        "file": str(victim.relative_to(run_dir)),
        "rerun_rc": rerun.returncode,
        "named": victim.name in text,
        "stages": statuses,
        "recovered": rerun.returncode == 0 and (run_dir / "eval" / "metrics.json").exists(),
        "message": _first_line_naming(text, victim.name),
    }


def _first_line_naming(text: str, name: str) -> str:
    return next((line.strip()[:160] for line in text.splitlines() if name in line), "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-corruption", action="store_true")
    parser.add_argument(
        "--window", type=float, nargs=2, metavar=("FROM", "TO"),
        help="kill between these seconds after the start (default: 1 s to the uninterrupted run's wall time)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_faults")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    sources = small_inputs(out / "inputs")
    reference_dir = out / "reference"
    shutil.rmtree(reference_dir, ignore_errors=True)
    tic = time.perf_counter()
    done = run(parsl_run_command(reference_dir, sources))
    wall = time.perf_counter() - tic
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return 1
    ref = {"shards": shard_digests(reference_dir), "losses": losses(reference_dir), "wall_s": wall}
    rng = random.Random(args.seed)
    first, last = args.window or (1.0, wall)
    delays = [rng.uniform(first, last) for _ in range(args.kills)]
    results: dict[str, Any] = {"reference_wall_s": wall, "kills": [], "corruption": []}
    for k, delay in enumerate(delays):  # in random order, so a run cut short still spans the stages
        results["kills"].append(kill_trial(k, delay, out, sources, ref))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    for kind in [] if args.no_corruption else corruption_cases(reference_dir):
        results["corruption"].append(corruption_trial(kind, reference_dir, out, sources))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    kills, corruption = results["kills"], results["corruption"]
    report(results, Console(width=200))
    return 0 if all(_kill_ok(k) for k in kills) and all(c["recovered"] for c in corruption) else 1


def _kill_ok(k: dict[str, Any]) -> bool:
    complete = k["rerun_rc"] == 0 and k["same_shards"] and k["same_losses"]
    return complete and k["steps_redone"] <= CHECKPOINT_EVERY


def report(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"kill -9, then rerun (uninterrupted run: {results['reference_wall_s']:.0f} s)")
    for column in ("trial", "killed at s", "stage", "rerun rc", "rerun s", "same shards", "same losses",
                   "steps redone"):  # fmt: skip
        table.add_column(column)
    for k in results["kills"]:
        cells = [k["trial"], k["kill_after_s"], k["stage"], k["rerun_rc"], k["rerun_s"], k["same_shards"],
                 k["same_losses"], k["steps_redone"]]  # fmt: skip
        table.add_row(*map(str, cells))
    console.print(table)
    table = Table(title="one artifact damaged, then rerun")
    for column in ("artifact", "file", "rerun rc", "file named", "recovered", "message"):
        table.add_column(column)
    for c in results["corruption"]:
        table.add_row(c["artifact"], c["file"], str(c["rerun_rc"]), str(c["named"]), str(c["recovered"]),
                      c["message"])  # fmt: skip
    console.print(table)
    bad = [k for k in results["kills"] if not _kill_ok(k)]
    console.print(f"kills: {len(results['kills']) - len(bad)} of {len(results['kills'])} recovered in full")


if __name__ == "__main__":
    sys.exit(main())
