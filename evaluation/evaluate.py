"""Evaluate a model file on the held-out split of prepared data: accuracy, MD stability, derivatives, plots.

    python -m evaluation.evaluate --model RUN/export/model.safetensors --data RUN/data --out RUN/eval
        [--baseline OTHER.safetensors] [--max-per-task 200] [--md-steps 200] [--fd-structures 3]

Writes ``metrics.json`` with the sha256 of the model it scored and:

- ``tasks``: per task, energy MAE/RMSE (meV/atom), force MAE/RMSE (meV/Å) and cosine similarity, the
  zero-force baseline (the force MAE of predicting no force: a model near it has not learned forces),
  stress MAE (meV/Å³ and GPa), counts, and ``n_unseen_elements``: structures holding an element that the
  model never saw in that task's training split (its reference energy is unknown, so its energy is a
  guess); ``baseline`` the same for ``--baseline`` on the same structures.
- ``md``: one short NVE run per periodic task and one molecule (`evaluation.md`), through the ASE calculator.
  Each starts from the smallest scored held-out structure of its task with at least ``MIN_MD_ATOMS``
  atoms, with Maxwell-Boltzmann velocities at 300 K (seed 0) and 1 fs steps. A large cell gets fewer
  steps (``md_atom_steps`` atom-steps per run, at least ``MIN_MD_STEPS``) so the evaluation stays within
  about a minute on two cores: the sample's held-out alloy cell (980 atoms) runs 5 steps, against 200 for
  the small crystals and the molecule.
- ``fd_check``: forces and stress against central finite differences of the energy on the smallest of
  those structures (``fd_structures``, at most ``FD_MAX_ATOMS`` atoms each), in float64 (the file's
  weights cast up: float32 rounding would swamp the difference), with the largest errors.
- ``plots``: ``parity.png`` and, when ``RUN/train/metrics.jsonl`` lies beside ``out_dir``, ``training.png``.

"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.stress import voigt_6_to_full_3x3_stress
from ase.units import GPa

from data_prep.loader import GraphDataset
from evaluation.md import describe as describe_md
from evaluation.md import run_nve
from matris.batch import collate
from matris.calculator import MatRISCalculator
from matris.graph import StructureGraph
from matris.io import file_sha256, load, write_atomic
from matris.model import MatRIS
from matris.properties import predict

MIN_MD_ATOMS = 4  # a one- or two-atom cell with its momentum removed barely moves
MIN_MD_STEPS = 5
FD_MAX_ATOMS = 64
FD_DELTA = 1e-4  # Å, and strain
FD_FORCE_TOLERANCE = 1e-4  # eV/Å
FD_STRESS_TOLERANCE = 1e-5  # eV/Å³


def select(tasks: np.ndarray, n_tasks: int, max_per_task: int) -> list[int]:
    """The first ``max_per_task`` held-out structures of each task, in stored order."""
    chosen = []
    for task in range(n_tasks):
        chosen.extend(np.flatnonzero(tasks == task)[:max_per_task].tolist())
    return sorted(chosen)


def batches(indices: list[int], sizes: np.ndarray, max_atoms: int) -> list[list[int]]:
    out, current, atoms = [], [], 0
    for i in indices:
        if current and atoms + sizes[i, 0] > max_atoms:
            out.append(current)
            current, atoms = [], 0
        current.append(i)
        atoms += int(sizes[i, 0])
    return out + ([current] if current else [])


def evaluate_model(
    model_path: Path,
    data_dir: Path,
    out_dir: Path,
    max_per_task: int = 200,
    split: str = "val",
    max_atoms: int = 2048,
    baseline: Path | None = None,
    md_steps: int = 200,
    md_atom_steps: int = 5_000,
    fd_structures: int = 3,
    plots: bool = True,
) -> dict[str, Any]:
    """Score ``model_path`` (and ``baseline``) on ``split`` of ``data_dir``; write ``out_dir/metrics.json``.

    ``md_steps=0`` skips the MD runs and ``fd_structures=0`` the finite-difference check. Everything runs on
    one torch thread (see `one_thread`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = {"start": time.perf_counter()}
    seconds: dict[str, float] = {}
    with one_thread():
        model = load(model_path)
        dataset = GraphDataset(data_dir, split=split, cutoff=model.config.cutoff)
        if len(dataset) == 0:
            raise ValueError(f"{data_dir} has no structures in the {split!r} split to evaluate on")
        task_of = np.array([dataset[i].task for i in range(len(dataset))])
        graphs = {i: dataset[i] for i in select(task_of, len(dataset.tasks), max_per_task)}
        tasks, parity = score(model, model_path, graphs, dataset.tasks, dataset.sizes, max_atoms)
        metrics: dict[str, Any] = {
            "model": str(model_path),
            "model_sha256": file_sha256(model_path),
            "split": split,
            "tasks": tasks,
        }
        seconds["accuracy"] = _lap(clock)
        if baseline is not None:
            metrics["baseline"] = {
                "model": str(baseline),
                "model_sha256": file_sha256(baseline),
                "tasks": score(load(baseline), baseline, graphs, dataset.tasks, dataset.sizes, max_atoms)[0],
            }
            seconds["baseline"] = _lap(clock)
        samples = md_samples(list(graphs.values()), dataset.tasks)
        if md_steps > 0:
            metrics["md"] = []
            for task, atoms in samples:
                steps = min(md_steps, max(MIN_MD_STEPS, md_atom_steps // len(atoms)))
                metrics["md"].append(
                    run_nve(atoms, MatRISCalculator(model, task=task), task, steps).as_dict()
                )
            seconds["md"] = _lap(clock)
        if fd_structures > 0:
            small = sorted((s for s in samples if len(s[1]) <= FD_MAX_ATOMS), key=lambda s: len(s[1]))
            metrics["fd_check"] = finite_difference_check(model, small[:fd_structures])
            seconds["fd_check"] = _lap(clock)
    if plots:
        from evaluation.plots import parity_plot, training_curves

        training = training_curves(out_dir.parent / "train" / "metrics.jsonl", out_dir / "training.png")
        metrics["plots"] = {
            "parity": str(parity_plot(parity, out_dir / "parity.png")),
            "training": None if training is None else str(training),
        }
        seconds["plots"] = _lap(clock)
    metrics["seconds"] = {**seconds, "total": round(sum(seconds.values()), 2)}
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def score(
    model: MatRIS,
    model_path: Path,
    graphs: dict[int, StructureGraph],
    data_tasks: list[str],
    sizes: np.ndarray,
    max_atoms: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[np.ndarray]]]]:
    """Per-task error metrics of ``model`` on ``graphs`` (by dataset index, whose ``sizes`` batch them),
    and the parity data behind them."""
    model_tasks = model.config.tasks
    unknown = sorted({data_tasks[g.task] for g in graphs.values()} - set(model_tasks))
    if unknown:
        raise ValueError(f"{model_path} was not trained on task(s) {unknown}; it knows {model_tasks}")
    dtype = next(model.parameters()).dtype
    trained = {task: model.trained_elements(task) for task in model_tasks}
    sums: dict[str, dict[str, float]] = {}
    parity: dict[str, dict[str, list[np.ndarray]]] = {}
    for chunk in batches(sorted(graphs), sizes, max_atoms):
        names = [data_tasks[graphs[i].task] for i in chunk]
        remapped = [replace(graphs[i], task=model_tasks.index(n)) for i, n in zip(chunk, names, strict=True)]
        batch = collate(remapped, dtype=dtype)
        pred = predict(model, batch, training=False)
        _accumulate(sums, parity, names, batch, pred, trained)
    return {task: _finish(values) for task, values in sorted(sums.items())}, parity


SUMS = ("n", "atoms", "e_abs", "e_sq", "f_abs", "f_sq", "f_zero", "f_cos", "s_n", "s_abs", "unseen")


def _accumulate(sums: dict, parity: dict, names: list[str], batch, pred: dict[str, torch.Tensor],
                trained: dict[str, set[int]]) -> None:  # fmt: skip
    n_atoms = batch.n_atoms.double()
    e_pred, e_ref = pred["energy"].double() / n_atoms, batch.energy.double() / n_atoms
    e_err = (e_pred - e_ref).abs()
    f_err = (pred["forces"] - batch.forces).double().abs()
    cos = torch.nn.functional.cosine_similarity(pred["forces"].double(), batch.forces.double(), dim=-1)
    for b, name in enumerate(names):
        s = sums.setdefault(name, dict.fromkeys(SUMS, 0.0))
        atoms = batch.atom_structure == b
        s["n"] += 1
        s["unseen"] += bool(set(batch.atomic_numbers[atoms].tolist()) - trained[name])
        s["f_zero"] += float(batch.forces[atoms].double().abs().sum())
        s["atoms"] += int(atoms.sum())
        s["e_abs"] += float(e_err[b])
        s["e_sq"] += float(e_err[b] ** 2)
        s["f_abs"] += float(f_err[atoms].sum())
        s["f_sq"] += float((f_err[atoms] ** 2).sum())
        s["f_cos"] += float(cos[atoms].sum())
        if batch.has_stress is not None and bool(batch.has_stress[b]):
            s["s_n"] += 1
            s["s_abs"] += float((pred["stress"][b] - batch.stress[b]).double().abs().mean())
        p = parity.setdefault(name, {"energy_ref": [], "energy_pred": [], "force_ref": [], "force_pred": []})
        p["energy_ref"].append(e_ref[b : b + 1].numpy())
        p["energy_pred"].append(e_pred[b : b + 1].numpy())
        p["force_ref"].append(batch.forces[atoms].double().numpy())
        p["force_pred"].append(pred["forces"][atoms].double().numpy())


def _finish(s: dict[str, float]) -> dict[str, Any]:
    components = 3 * s["atoms"]
    stress = s["s_abs"] / s["s_n"] * 1000 if s["s_n"] else None
    return {
        "n_structures": int(s["n"]),
        "n_atoms": int(s["atoms"]),
        "energy_mae_mev_per_atom": 1000 * s["e_abs"] / s["n"],
        "energy_rmse_mev_per_atom": 1000 * (s["e_sq"] / s["n"]) ** 0.5,
        "force_mae_mev_per_a": 1000 * s["f_abs"] / components,
        "force_rmse_mev_per_a": 1000 * (s["f_sq"] / components) ** 0.5,
        "force_zero_mae_mev_per_a": 1000 * s["f_zero"] / components,
        "force_cosine": s["f_cos"] / s["atoms"],
        "n_stress": int(s["s_n"]),
        "stress_mae_mev_per_a3": stress,
        "stress_mae_gpa": None if stress is None else stress / 1000 / GPa,
        "n_unseen_elements": int(s["unseen"]),
    }


def to_atoms(graph: StructureGraph, task: str) -> Atoms:
    """An ``ase.Atoms`` of a stored structure, with the task, charge and spin the calculator reads."""
    atoms = Atoms(numbers=graph.atomic_numbers, positions=graph.positions, cell=graph.cell, pbc=graph.pbc)
    atoms.info.update(task=task, charge=graph.charge, spin=graph.spin)
    return atoms


def md_samples(graphs: list[StructureGraph], tasks: list[str]) -> list[tuple[str, Atoms]]:
    """The smallest of ``graphs`` (at least ``MIN_MD_ATOMS`` atoms where there is one) of every periodic
    task, and of the first non-periodic task: the MD starting points."""
    out, molecule = [], False
    for index, task in enumerate(tasks):
        members = [g for g in graphs if g.task == index]
        if not members:
            continue
        periodic = bool(members[0].pbc.all())
        if not periodic and molecule:
            continue
        molecule = molecule or not periodic
        big_enough = [g for g in members if g.n_atoms >= MIN_MD_ATOMS] or members
        out.append((task, to_atoms(min(big_enough, key=lambda g: g.n_atoms), task)))
    return out


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for a while. Evaluation runs small batches and, for MD and finite
    differences, one small structure at a time, where OpenMP's waits between threads cost more than a
    second core gains, and far more when other processes share the cores. On a busy 2-core machine a
    4-atom MD step took 25 ms on one thread against 110-500 ms on two (the 980-atom alloy cell: 1.5 s
    against 13-18 s), and scoring the sample's held-out split 3.0 s against 7.9 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finite_difference_check(model: MatRIS, samples: list[tuple[str, Atoms]], components: int = 6,
                            seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Largest differences between the calculator's forces/stress and central differences of its energy.

    Checks ``components`` random atom coordinates per structure and, for periodic cells, all six strain
    components (ε symmetric, applied as r → r (1 + ε) with fractional coordinates kept, as the model does).
    """
    model = copy.deepcopy(model).double()
    rng = np.random.default_rng(seed)
    rows = []
    for task, atoms in samples:
        calc = MatRISCalculator(model, task=task)
        atoms = atoms.copy()
        forces = calc.get_forces(atoms).copy()
        energy = calc.get_potential_energy
        picks = rng.choice(3 * len(atoms), min(components, 3 * len(atoms)), replace=False)
        force_error = 0.0
        for pick in picks.tolist():
            i, axis = divmod(pick, 3)
            shifted = []
            for sign in (1, -1):
                probe = atoms.copy()
                probe.positions[i, axis] += sign * FD_DELTA
                shifted.append(float(energy(probe)))
            force_error = max(force_error, abs(-(shifted[0] - shifted[1]) / (2 * FD_DELTA) - forces[i, axis]))
        stress_error = None
        if atoms.pbc.all():
            stress = voigt_6_to_full_3x3_stress(calc.get_stress(atoms))
            stress_error = 0.0
            for a, b in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)):
                strained = []
                for sign in (1, -1):
                    deform = np.eye(3)
                    deform[a, b] += sign * FD_DELTA / 2
                    deform[b, a] += sign * FD_DELTA / 2
                    probe = atoms.copy()
                    probe.set_cell(atoms.cell.array @ deform, scale_atoms=True)
                    strained.append(float(energy(probe)))
                numeric = (strained[0] - strained[1]) / (2 * FD_DELTA) / atoms.get_volume()
                stress_error = max(stress_error, abs(numeric - stress[a, b]))
        rows.append({"task": task, "formula": atoms.get_chemical_formula(), "n_atoms": len(atoms),
                     "force_components": len(picks), "max_force_error_ev_per_a": force_error,
                     "max_stress_error_ev_per_a3": stress_error})  # fmt: skip
    worst_force = max((r["max_force_error_ev_per_a"] for r in rows), default=None)
    stress_errors = [
        r["max_stress_error_ev_per_a3"] for r in rows if r["max_stress_error_ev_per_a3"] is not None
    ]
    worst_stress = max(stress_errors, default=None)
    return {
        "delta": FD_DELTA,
        "dtype": "float64",
        "structures": rows,
        "max_force_error_ev_per_a": worst_force,
        "max_stress_error_ev_per_a3": worst_stress,
        "passed": bool(
            rows
            and worst_force < FD_FORCE_TOLERANCE
            and (worst_stress is None or worst_stress < FD_STRESS_TOLERANCE)
        ),
    }


COLUMNS = [
    ("energy MAE meV/atom", "energy_mae_mev_per_atom", ".1f"),
    ("energy RMSE meV/atom", "energy_rmse_mev_per_atom", ".1f"),
    ("force MAE meV/Å", "force_mae_mev_per_a", ".1f"),
    ("zero-force MAE meV/Å", "force_zero_mae_mev_per_a", ".1f"),
    ("force RMSE meV/Å", "force_rmse_mev_per_a", ".1f"),
    ("force cos", "force_cosine", ".3f"),
    ("stress MAE meV/Å³", "stress_mae_mev_per_a3", ".2f"),
    ("stress MAE GPa", "stress_mae_gpa", ".3f"),
    ("unseen elements", "n_unseen_elements", "d"),
]


def table_rows(
    metrics: dict[str, Any], columns: list[tuple[str, str, str]] = COLUMNS
) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the per-task error table (``columns``: header, metrics key, format), shared
    by this command's plain printout and the workflow's rich table. With a baseline, each task's row is
    followed by a ``  baseline`` row."""
    header = ["task", "structures", *(name for name, _, _ in columns)]
    sources = [("{task}", metrics["tasks"])]
    if "baseline" in metrics:
        sources.append(("  baseline", metrics["baseline"]["tasks"]))
    rows = []
    for task in metrics["tasks"]:
        for label, tasks in sources:
            values = tasks.get(task)
            if values is not None:
                cells = [_optional(values.get(key), spec) for _, key, spec in columns]
                rows.append([label.format(task=task), str(values["n_structures"]), *cells])
    return header, rows


def fd_line(fd: dict[str, Any]) -> str:
    stress = fd["max_stress_error_ev_per_a3"]
    return (
        f"finite differences ({len(fd['structures'])} structures, {fd['dtype']}, δ={fd['delta']:g}): "
        f"max |F - F_fd| {fd['max_force_error_ev_per_a']:.2e} eV/Å, max |σ - σ_fd| "
        f"{'n/a' if stress is None else f'{stress:.2e} eV/Å³'}: {'passed' if fd['passed'] else 'FAILED'}"
    )


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """The MD, finite-difference and plot lines that follow the error table."""
    lines = [describe_md(record) for record in metrics.get("md", [])]
    if "fd_check" in metrics:
        lines.append(fd_line(metrics["fd_check"]))
    lines += [f"{name} plot: {path}" for name, path in metrics.get("plots", {}).items() if path]
    return lines


def format_report(metrics: dict[str, Any]) -> str:
    header, rows = table_rows(metrics)
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    title = f"held-out errors ({metrics['split']} split) of {metrics['model']}"
    if "baseline" in metrics:
        title += f" vs baseline {metrics['baseline']['model']}"
    table = ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in
                       enumerate(zip(row, widths, strict=True))) for row in [header, *rows]]  # fmt: skip
    return "\n".join([title, *table, *report_lines(metrics)])


def _optional(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _lap(clock: dict[str, float]) -> float:
    now = time.perf_counter()
    elapsed, clock["start"] = now - clock["start"], now
    return round(elapsed, 2)


def evaluated_model(metrics_path: Path) -> str | None:
    """sha256 of the model a metrics file scored (None if unreadable)."""
    try:
        return json.loads(Path(metrics_path).read_text()).get("model_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (manifest.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, help="another model file to score on the same structures")
    parser.add_argument("--max-per-task", type=int, default=200)
    parser.add_argument("--md-steps", type=int, default=200, help="NVE steps per sample (0: no MD)")
    parser.add_argument("--fd-structures", type=int, default=3, help="finite-difference check (0: none)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_model(
            args.model, args.data, args.out, args.max_per_task, baseline=args.baseline,
            md_steps=args.md_steps, fd_structures=args.fd_structures, plots=not args.no_plots,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"evaluation.evaluate: {err}", file=sys.stderr)
        return 1
    print(format_report(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'} in {metrics['seconds']['total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
