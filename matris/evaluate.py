"""Per-task errors of a model file on the held-out split of prepared data.

    python -m matris.evaluate --model RUN/export/model.safetensors --data RUN/data --out RUN/eval

Writes ``metrics.json`` (per task: energy MAE/RMSE in meV/atom, force MAE/RMSE in meV/Å, stress MAE in
meV/Å³ and GPa, counts) with the sha256 of the model it scored. Reading the shards needs `data_prep`
(h5py), imported here only, so `import matris` stays free of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.units import GPa

from matris.batch import collate
from matris.io import load
from matris.properties import predict


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
    model_path: Path, data_dir: Path, out_dir: Path, max_per_task: int = 200, split: str = "val",
    max_atoms: int = 2048,
) -> dict[str, Any]:  # fmt: skip
    from data_prep.loader import GraphDataset

    model = load(model_path)
    dtype = next(model.parameters()).dtype
    dataset = GraphDataset(data_dir, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir} has no structures in the {split!r} split to evaluate on")
    model_tasks = model.config.tasks
    unknown = sorted(set(dataset.tasks) - set(model_tasks))
    if unknown:
        raise ValueError(f"{model_path} was not trained on task(s) {unknown}; it knows {model_tasks}")
    task_of = np.array([dataset[i].task for i in range(len(dataset))])
    sums: dict[str, dict[str, float]] = {}
    for chunk in batches(select(task_of, len(dataset.tasks), max_per_task), dataset.sizes, max_atoms):
        graphs = [dataset[i] for i in chunk]
        names = [dataset.tasks[g.task] for g in graphs]
        remapped = [_with_task(g, model_tasks.index(name)) for g, name in zip(graphs, names, strict=True)]
        batch = collate(remapped, dtype=dtype)
        pred = predict(model, batch, training=False)
        _accumulate(sums, names, batch, pred)
    metrics = {
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "split": split,
        "tasks": {task: _finish(values) for task, values in sorted(sums.items())},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, out_dir / "metrics.json")
    return metrics


def _with_task(graph, task: int):
    from dataclasses import replace

    return replace(graph, task=task)


def _accumulate(sums: dict, names: list[str], batch, pred: dict[str, torch.Tensor]) -> None:
    n_atoms = batch.n_atoms.double()
    e_err = ((pred["energy"] - batch.energy).double() / n_atoms).abs()
    f_err = (pred["forces"] - batch.forces).double().abs()
    cos = torch.nn.functional.cosine_similarity(pred["forces"].double(), batch.forces.double(), dim=-1)
    for b, name in enumerate(names):
        s = sums.setdefault(name, {"n": 0, "atoms": 0, "e_abs": 0.0, "e_sq": 0.0, "f_abs": 0.0, "f_sq": 0.0,
                                   "f_cos": 0.0, "s_n": 0, "s_abs": 0.0})  # fmt: skip
        atoms = batch.atom_structure == b
        s["n"] += 1
        s["atoms"] += int(atoms.sum())
        s["e_abs"] += float(e_err[b])
        s["e_sq"] += float(e_err[b] ** 2)
        s["f_abs"] += float(f_err[atoms].sum())
        s["f_sq"] += float((f_err[atoms] ** 2).sum())
        s["f_cos"] += float(cos[atoms].sum())
        if batch.has_stress is not None and bool(batch.has_stress[b]):
            s["s_n"] += 1
            s["s_abs"] += float((pred["stress"][b] - batch.stress[b]).double().abs().mean())


def _finish(s: dict[str, float]) -> dict[str, Any]:
    components = 3 * s["atoms"]
    stress = s["s_abs"] / s["s_n"] * 1000 if s["s_n"] else None
    return {
        "n_structures": s["n"],
        "n_atoms": s["atoms"],
        "energy_mae_mev_per_atom": 1000 * s["e_abs"] / s["n"],
        "energy_rmse_mev_per_atom": 1000 * (s["e_sq"] / s["n"]) ** 0.5,
        "force_mae_mev_per_a": 1000 * s["f_abs"] / components,
        "force_rmse_mev_per_a": 1000 * (s["f_sq"] / components) ** 0.5,
        "force_cosine": s["f_cos"] / s["atoms"],
        "n_stress": s["s_n"],
        "stress_mae_mev_per_a3": stress,
        "stress_mae_gpa": None if stress is None else stress / 1000 / GPa,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluated_model(metrics_path: Path) -> str | None:
    """sha256 of the model a metrics file scored (None if unreadable)."""
    try:
        return json.loads(Path(metrics_path).read_text()).get("model_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matris.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="prepared data folder (manifest.json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-per-task", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_model(args.model, args.data, args.out, args.max_per_task)
    except (FileNotFoundError, ValueError) as err:
        print(f"matris.evaluate: {err}", file=sys.stderr)
        return 1
    print(json.dumps(metrics["tasks"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
