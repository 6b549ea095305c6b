"""The run's ``manifest.json``: settings, task list, shard list with checksums, statistics and
per-task per-element reference energies.

Chunks report sufficient statistics (counts, sums and the normal equations of the reference-energy fit)
so ``finalize`` never rereads the shards. Reference energies fit ``E ≈ Σ_Z count_Z · e_Z`` per task on
the train split by least squares with a small ridge (elements that always appear in the same ratio get
the minimum-norm split rather than a singular solve).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from data_prep.shards import SCHEMA_VERSION
from data_prep.validate import Record
from matris.io import write_atomic

RIDGE = 1e-8  # relative to the mean diagonal of the normal matrix
N_ELEMENTS = 119  # atomic numbers 0..118 (validation rejects 0)


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never a partial one."""
    write_atomic(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode())


def chunk_stats(records: Iterable[tuple[Record, str]]) -> dict:
    """Element histogram (all accepted) and per-task statistics (train split only) of one chunk."""
    elements = np.zeros(N_ELEMENTS, dtype=np.int64)
    tasks: dict[str, dict] = {}
    for record, split in records:
        composition = np.bincount(record.numbers, minlength=N_ELEMENTS)
        elements += composition
        t = tasks.setdefault(record.task, {"count_val": 0, "rows": [], "records": []})
        if split != "train":
            t["count_val"] += 1
            continue
        t["rows"].append(composition)
        t["records"].append(record)
    return {
        "elements": {int(z): int(elements[z]) for z in np.flatnonzero(elements)},
        "tasks": {name: _task_sums(t) for name, t in tasks.items()},
    }


def _task_sums(t: dict) -> dict:
    records = t["records"]
    rows = np.array(t["rows"], dtype=np.float64).reshape(len(records), N_ELEMENTS)
    zs = np.flatnonzero(rows.sum(axis=0))
    a = rows[:, zs]
    y = np.array([record.energy for record in records])
    n_atoms = sum(len(record.numbers) for record in records)
    return {
        "count": len(records),
        "count_val": t["count_val"],
        "n_atoms": n_atoms,
        "energy_per_atom_sum": float(sum(r.energy / len(r.numbers) for r in records)),
        "force_sq_sum": float(sum(np.square(r.forces).sum() for r in records)),
        "force_components": 3 * n_atoms,
        "elements": zs.tolist(),
        "ata": (a.T @ a).tolist(),
        "aty": (a.T @ y).tolist(),
    }


def merge_stats(parts: Sequence[dict]) -> dict:
    """Sum chunk statistics; normal equations are embedded into the union of elements per task."""
    elements: dict[int, int] = {}
    tasks: dict[str, dict] = {}
    for part in parts:
        for z, c in part["elements"].items():
            elements[int(z)] = elements.get(int(z), 0) + c
        for name, t in part["tasks"].items():
            tasks.setdefault(name, []).append(t)
    merged = {}
    for name, items in tasks.items():
        zs = sorted({int(z) for t in items for z in t["elements"]})
        where = {z: k for k, z in enumerate(zs)}
        ata, aty = np.zeros((len(zs), len(zs))), np.zeros(len(zs))
        for t in items:
            if t["elements"]:
                idx = np.array([where[int(z)] for z in t["elements"]])
                ata[np.ix_(idx, idx)] += np.array(t["ata"])
                aty[idx] += np.array(t["aty"])
        sums = {k: sum(t[k] for t in items) for k in ("count", "count_val", "n_atoms", "force_components")}
        sums["energy_per_atom_sum"] = sum(t["energy_per_atom_sum"] for t in items)
        sums["force_sq_sum"] = sum(t["force_sq_sum"] for t in items)
        merged[name] = {**sums, "elements": zs, "ata": ata, "aty": aty}
    return {"elements": dict(sorted(elements.items())), "tasks": dict(sorted(merged.items()))}


def reference_energies(ata: np.ndarray, aty: np.ndarray) -> np.ndarray:
    """Per-element energies from the normal equations ``AᵀA e = Aᵀy`` with a small ridge."""
    if ata.size == 0:
        return np.zeros(0)
    ridge = RIDGE * max(float(np.mean(np.diag(ata))), 1e-12)
    solution, *_ = np.linalg.lstsq(ata + ridge * np.eye(len(ata)), aty, rcond=None)
    return solution


def build(
    settings: dict, shards: Sequence[dict], stats: dict, n_rejected: int, sources: Sequence[str]
) -> dict:
    """The manifest dict; ``tasks`` is sorted and a task's index everywhere is its position in it."""
    tasks = sorted(stats["tasks"])
    task_stats, references = {}, {}
    for name in tasks:
        t = stats["tasks"][name]
        count = t["count"]
        task_stats[name] = {
            "count": count,
            "count_val": t["count_val"],
            "energy_per_atom_mean": t["energy_per_atom_sum"] / count if count else None,
            "force_rms": float(np.sqrt(t["force_sq_sum"] / t["force_components"])) if count else None,
        }
        values = reference_energies(t["ata"], t["aty"])
        references[name] = {str(z): float(e) for z, e in zip(t["elements"], values, strict=True)}
    return {
        "schema_version": SCHEMA_VERSION,
        **settings,
        "tasks": tasks,
        "sources": list(sources),
        "n_structures": sum(s["n_structures"] for s in shards),
        "n_rejected": n_rejected,
        "n_train": sum(s["n_structures"] for s in shards if s["split"] == "train"),
        "n_val": sum(s["n_structures"] for s in shards if s["split"] == "val"),
        "shards": list(shards),
        "elements": {str(z): c for z, c in stats["elements"].items()},
        "task_stats": task_stats,
        "reference_energies": references,
    }


def read(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())
