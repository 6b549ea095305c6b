"""What a potential learns at equal wall-clock: this project's trainer against MACE, on the same frames.

    python benchmarks/bench_accuracy.py [FILE ...] [--budget-s 600] [--preset tiny] [--mace-venv DIR]
        [--single-task] [--no-mace] [--steps N] [--set train.lr=3e-3 ...] [--out DIR]

Default input: the bundled sample. The frames are prepared once (`python -m data_prep`, the pipeline's
deterministic train/val split); both models train on the train split and are scored on the val split.

- Ours: `python -m janus.train`, the pipeline's trainer with the pipeline's defaults (`janus.config`),
  for the budget itself (``train.time_budget_s``: steps, validation and checkpoints count, the first
  step's compilation too, the process start-up not; the learning rate decays over the seconds). Its
  validation picks the exported weights (`janus.export`), as in the pipeline.
- MACE: `mace_run_train` from `mace-torch` in its own venv (made at ``--mace-venv`` if missing: torch
  2.13.0 CPU wheel, then mace-torch), 64x0e, r_max 6 Å, float32, E0s averaged, stress loss, with the
  val split as its validation file (it keeps its best epoch on it, as ours keeps its best validation).
  A one-epoch run measures its epoch's training time (from its log: start-up and the error tables it
  writes after training are not counted), then it continues from that epoch's checkpoint up to the
  fewest whole epochs whose training time reaches the budget (so MACE trains at least as long as ours;
  ``process_seconds`` in ``results.json`` has its wall time). MACE has
  no task input, so it runs only when the input holds one task.
- ``--steps N`` trains ours for N steps instead of a budget, and ``--set KEY=VALUE`` changes its janus
  config (`python -m janus.train --set`): with ``--no-mace``, one change of the recipe measured at a time.
- ``--single-task`` (inputs of several tasks): ours again on each task alone, for as many of that task's
  structures as the mixed run saw (the same epochs), to show negative transfer.

Scores come from the two ASE calculators on the same frames with one piece of arithmetic: energy MAE
(meV/atom), force MAE (meV/Å), the zero-force MAE beside it, force cosine, stress MAE (meV/Å³). Prints one
table per task and the target lines, writes ``results.json`` and ``force_error_vs_time.png`` (held-out
force MAE against training seconds, both models) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from _accuracy_scoring import score_frames
from rich.console import Console
from rich.table import Table

from evaluation.evaluate import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUTS = sorted((ROOT / "sample_data").glob("*.extxyz.gz"))
UNBOUNDED_STEPS = 1_000_000  # with a time budget, the seconds end the run
EVAL_EVERY = 100
MACE_LOG_LINE = re.compile(r"^(\S+ \S+)\.\d+ INFO: Epoch (\d+): .*MAE_F=\s*([\d.]+) meV / A")
MACE_STARTED = re.compile(r"^(\S+ \S+)\.\d+ INFO: Started training")


# -- ours -------------------------------------------------------------------------------------------------


def prepare(inputs: list[Path], out: Path) -> Path:
    if not (out / "manifest.json").is_file():
        run([sys.executable, "-m", "data_prep", *map(str, inputs), "--out", str(out)])
    return out


def run(cmd: list[str], **kwargs) -> float:
    """Run ``cmd`` from the project root; its wall seconds."""
    tic = time.perf_counter()
    done = subprocess.run(cmd, cwd=kwargs.pop("cwd", ROOT), capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - tic


def train_ours(
    data: Path, out: Path, preset: str, train: dict[str, Any], overrides: tuple[str, ...]
) -> float:
    """`python -m janus.train` on ``data`` with the pipeline's defaults, ``train`` and ``overrides``."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": {"preset": preset}, "train": train, "data_dir": str(data)}
    config["out_dir"] = str(out / "train")
    (out / "janus.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(out / "train", ignore_errors=True)
    sets = [arg for text in overrides for arg in ("--set", text)]
    return run([sys.executable, "-m", "janus.train", "--config", str(out / "janus.yaml"), *sets])


def ours(
    data: Path,
    out: Path,
    preset: str,
    budget_s: float | None,
    steps: int | None = None,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train for ``budget_s`` seconds (the trainer's ``train.time_budget_s``: the learning rate decays over
    them) or for ``steps``, export the best-validation weights, score them on the val split."""
    from data_prep import iter_atoms
    from data_prep.loader import BatchPlan, GraphDataset
    from janus.config import JanusConfig
    from janus.export import export_checkpoint
    from janus.overrides import build
    from matris import MatRISCalculator

    if steps is None:
        train = {"steps": UNBOUNDED_STEPS, "time_budget_s": budget_s, "eval_every": EVAL_EVERY}
    else:
        train = {"steps": steps, "eval_every": max(1, steps // 10)}
    seconds = train_ours(data, out, preset, train, overrides)
    model = out / "model.safetensors"
    provenance = export_checkpoint(out / "train" / "checkpoints", model, data_dir=data)
    frames = list(iter_atoms(data, split="val"))
    scores = score_frames(frames, lambda atoms: MatRISCalculator(model, task=atoms.info["task"]))
    rows = read_jsonl(out / "train" / "metrics.jsonl")
    done = [r for r in rows if r.get("kind") != "validation"]
    config = build(JanusConfig, yaml.safe_load((out / "janus.yaml").read_text()), list(overrides)).train
    plan = BatchPlan(
        GraphDataset(data, split="train").sizes,
        max_atoms=config.max_atoms_per_batch,
        max_edges=config.max_edges_per_batch,
        seed=config.seed,
        max_triplets=config.max_triplets_per_batch,
    )
    return {
        "steps": len(done),
        "train_seconds": done[-1]["elapsed_s"],
        "process_seconds": seconds,
        "epochs": len(done) / len(plan.batches(0)),
        "weights": provenance["weights"],
        "tasks": scores,
        "curve": curve_ours(rows),
    }


def curve_ours(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per task (seconds of training so far, held-out force MAE) at each validation of the model weights."""
    elapsed, out = 0.0, {}
    for row in rows:
        if row.get("kind") == "validation":
            elapsed += row["seconds"]
            if row["weights"] == "model":
                for task, values in row["tasks"].items():
                    out.setdefault(task, []).append((elapsed, values["force_mae_mev_per_a"]))
        else:
            elapsed += row["step_time_s"]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# -- MACE -------------------------------------------------------------------------------------------------


def mace_venv(path: Path) -> Path:
    """The peer's venv (created when missing): never the project's own."""
    python = path / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(path)])
        run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0"])
        run([str(python), "-m", "pip", "install", "--quiet", "mace-torch==0.3.16"])
    return path


def write_mace_frames(data: Path, split: str, path: Path) -> int:
    """The split as extxyz with MACE's REF_ keys (stress as a 3×3 matrix)."""
    import ase.io
    from ase.stress import voigt_6_to_full_3x3_stress

    from data_prep import iter_atoms

    frames = []
    for atoms in iter_atoms(data, split=split):
        plain = atoms.copy()
        plain.calc = None
        plain.info = {"REF_energy": atoms.get_potential_energy(), "task": atoms.info["task"]}
        plain.arrays["REF_forces"] = atoms.get_forces()
        stress = atoms.calc.results.get("stress")
        if stress is not None:
            plain.info["REF_stress"] = voigt_6_to_full_3x3_stress(stress)
        frames.append(plain)
    ase.io.write(path, frames, format="extxyz")
    return len(frames)


def train_mace(venv: Path, work: Path, epochs: int) -> float:
    """MACE up to ``epochs`` in ``work/run``, continuing from its checkpoint there if one exists."""
    (work / "run").mkdir(parents=True, exist_ok=True)
    cmd = [
        str(venv / "bin" / "mace_run_train"), "--name", "mace", "--train_file", str(work / "train.xyz"),
        "--valid_file", str(work / "valid.xyz"), "--E0s", "average", "--model", "MACE",
        "--hidden_irreps", "64x0e", "--r_max", "6.0", "--batch_size", "16", "--max_num_epochs", str(epochs),
        "--device", "cpu", "--default_dtype", "float32", "--energy_key", "REF_energy",
        "--forces_key", "REF_forces", "--stress_key", "REF_stress", "--loss", "stress",
        "--stress_weight", "1.0", "--error_table", "PerAtomMAE", "--eval_interval", "1", "--seed", "1",
        "--restart_latest",
    ]  # fmt: skip
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    return run(cmd, cwd=work / "run", env=env)


def mace(data: Path, out: Path, venv: Path, budget_s: float) -> dict[str, Any]:
    from data_prep import iter_atoms

    out.mkdir(parents=True, exist_ok=True)
    write_mace_frames(data, "train", out / "train.xyz")
    write_mace_frames(data, "val", out / "valid.xyz")
    shutil.rmtree(out / "run", ignore_errors=True)
    wall = train_mace(venv, out, 1)
    (epoch_s,) = (seconds for seconds, _ in mace_epochs(out / "run" / "logs"))
    epochs = max(1, math.ceil(budget_s / epoch_s))  # at least the budget: ratios then favour MACE
    # a restart repeats the epoch number of its checkpoint: epochs - 1 more make ``epochs`` in all
    wall += train_mace(venv, out, epochs - 1) if epochs > 1 else 0.0
    model = out / "run" / "mace.model"
    frames = list(iter_atoms(data, split="val"))
    scores = mace_scores(venv, model, out, frames)
    curve = mace_epochs(out / "run" / "logs")
    return {
        "epochs": epochs,
        "one_epoch_seconds": epoch_s,
        "train_seconds": curve[-1][0],
        "process_seconds": wall,
        "tasks": scores,
        "curve": {frames[0].info["task"]: curve},
    }


def mace_scores(venv: Path, model: Path, out: Path, frames: list) -> dict[str, Any]:
    """Score in MACE's venv (its calculator needs its packages): this file's ``score_frames`` run there."""
    import ase.io

    ase.io.write(out / "scored.xyz", [_labelled(a) for a in frames], format="extxyz")
    script = (
        "import json, sys, ase.io\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from _accuracy_scoring import score_frames\n"
        "from mace.calculators import MACECalculator\n"
        f"calc = MACECalculator(model_paths={str(model)!r}, device='cpu', default_dtype='float32')\n"
        f"frames = ase.io.read({str(out / 'scored.xyz')!r}, ':')\n"
        "print(json.dumps(score_frames(frames, lambda atoms: calc)))\n"
    )
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _labelled(atoms):
    """``atoms`` whose single-point calculator extxyz writes and reads back (labels, task)."""
    copy = atoms.copy()
    copy.calc = atoms.calc
    return copy


def mace_epochs(log_dir: Path) -> list[tuple[float, float]]:
    """(training seconds so far, validation force MAE) after each epoch in MACE's log: the time from each
    run's "Started training" to its epoch lines, added up over the run and its restarts (start-up, data
    loading and the error tables MACE writes after training are not training time)."""
    points, before, started, last = [], 0.0, None, None
    for log in sorted(p for p in log_dir.glob("*.log") if not p.name.endswith("_debug.log")):
        for line in log.read_text().splitlines():
            begun, epoch = MACE_STARTED.match(line), MACE_LOG_LINE.match(line)
            if begun:
                before += (last - started) if started is not None and last is not None else 0.0
                started, last = _when(begun.group(1)), None
            elif epoch and started is not None:
                last = _when(epoch.group(1))
                points.append((before + last - started, float(epoch.group(3))))
    return points


def _when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()


# -- report -----------------------------------------------------------------------------------------------


SCORED = ("energy_mae_mev_per_atom", "force_mae_mev_per_a", "force_zero_mae_mev_per_a", "force_cosine",
          "stress_mae_mev_per_a3")  # what `score_frames` reports, in the evaluation's columns


def columns() -> list[tuple[str, str, str]]:
    return [column for column in COLUMNS if column[1] in SCORED]


def report(results: dict[str, Any], console: Console) -> list[str]:
    """One table per task; returns the target lines."""
    runs = {name: r for name, r in results["runs"].items() if r}
    length = f"{results['steps']} steps" if results.get("steps") else f"{results['budget_s']:.0f} s budgets"
    singles = runs.get("single-task", {}).values()
    for task in sorted({t for r in [runs["ours"], *singles] for t in r["tasks"]}):
        table = Table(title=f"{task}: held-out errors after {length}")
        for column in ["model", *(c for c, _, _ in columns()), "training s", "epochs"]:
            table.add_column(column, justify="right" if column != "model" else "left")
        for name, r in runs.items():
            r = r.get(task) if name == "single-task" else r
            values = r["tasks"].get(task) if r else None
            if values is None:
                continue
            seconds, epochs = r["train_seconds"], r["epochs"]
            cells = ["—" if values.get(k) is None else format(values[k], f) for _, k, f in columns()]
            table.add_row(name, *cells, f"{seconds:.0f}", f"{epochs:.2f}")
        console.print(table)
    return targets(runs)


def targets(runs: dict[str, Any]) -> list[str]:
    lines, ours_run = [], runs["ours"]
    peer = runs.get("mace")
    for task, values in ours_run["tasks"].items():
        zero = values["force_mae_mev_per_a"] / values["force_zero_mae_mev_per_a"]
        lines.append(f"{task}: force MAE {zero:.2f}x its zero-force baseline (target ≤ 0.5 in a mix)")
        if peer and task in peer["tasks"]:
            f = values["force_mae_mev_per_a"] / peer["tasks"][task]["force_mae_mev_per_a"]
            e = values["energy_mae_mev_per_atom"] / peer["tasks"][task]["energy_mae_mev_per_atom"]
            lines.append(
                f"{task}: force MAE {f:.2f}x MACE's (target ≤ 0.6: {'met' if f <= 0.6 else 'missed'}), "
                f"energy MAE {e:.2f}x MACE's (target ≤ 0.4: {'met' if e <= 0.4 else 'missed'})"
            )
        single = runs.get("single-task", {}).get(task)
        if single:
            ratio = values["force_mae_mev_per_a"] / single["tasks"][task]["force_mae_mev_per_a"]
            lines.append(
                f"{task}: force MAE {ratio:.2f}x the same model trained on it alone "
                f"(target ≤ 1.2: {'met' if ratio <= 1.2 else 'missed'})"
            )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {name: r for name, r in results["runs"].items() if r and "curve" in r}
    tasks = sorted({t for r in runs.values() for t in r["curve"]})
    figure = Figure(figsize=(5 * len(tasks), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        for name, r in runs.items():
            points = r["curve"].get(task)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(f"{task}: held-out force MAE")
        ax.set_xlabel("training seconds")
        ax.set_ylabel("meV/Å")
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path, default=DEFAULT_INPUTS)
    parser.add_argument("--budget-s", type=float, default=600.0, help="training wall-clock per model")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mace-venv", type=Path, default=Path("/work/peers-venv"))
    parser.add_argument("--no-mace", action="store_true")
    parser.add_argument("--single-task", action="store_true", help="also train ours on each task alone")
    parser.add_argument("--steps", type=int, help="train ours for N steps, not the budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="janus config change")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_accuracy")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.inputs if not p.is_file()]
    if missing:
        print(f"bench_accuracy: input file(s) not found: {', '.join(missing)}")
        return 1
    out = args.out.resolve()  # MACE runs in its own working directory
    data = prepare(args.inputs, out / "data")
    tasks = json.loads((data / "manifest.json").read_text())["tasks"]
    results: dict[str, Any] = {
        "inputs": [str(p) for p in args.inputs],
        "budget_s": args.budget_s,
        "steps": args.steps,
        "preset": args.preset,
        "load_average": os.getloadavg()[0],
        "runs": {},
    }
    overrides = tuple(args.set)
    results["overrides"] = list(overrides)
    results["runs"]["ours"] = ours(data, out / "ours", args.preset, args.budget_s, args.steps, overrides)
    if not args.no_mace and len(tasks) == 1:
        venv = mace_venv(args.mace_venv)
        results["runs"]["mace"] = mace(data, out / "mace", venv, args.budget_s)
    if args.single_task and len(tasks) > 1:
        mixed = results["runs"]["ours"]
        results["runs"]["single-task"] = single_task(args.inputs, out, args.preset, mixed, overrides)
    console = Console(width=200)
    lines = report(results, console)
    for line in lines:
        console.print(line, highlight=False)
    results["targets"] = lines
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "force_error_vs_time.png")
    print(f"wrote {out / 'results.json'} and {out / 'force_error_vs_time.png'}")
    return 0


def single_task(
    inputs: list[Path], out: Path, preset: str, mixed: dict[str, Any], overrides: tuple[str, ...]
) -> dict[str, Any]:
    """Ours on each input file alone (one task per file), for the mixed run's number of epochs."""
    from data_prep.loader import BatchPlan, GraphDataset
    from janus.config import TrainConfig

    budget = TrainConfig().max_atoms_per_batch
    runs = {}
    for path in inputs:
        data = prepare([path], out / "single" / path.name.split(".")[0] / "data")
        (task,) = json.loads((data / "manifest.json").read_text())["tasks"]
        dataset = GraphDataset(data, split="train")
        per_epoch = len(BatchPlan(dataset.sizes, max_atoms=budget, max_edges=None, seed=0).batches(0))
        steps = max(1, math.ceil(mixed["epochs"] * per_epoch))
        runs[task] = ours(data, data.parent / "ours", preset, None, steps, overrides)
    return runs


if __name__ == "__main__":
    sys.exit(main())
