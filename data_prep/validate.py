"""Turn one reader record into a checked ``Record`` with its neighbour graph, or reject it naming a field.

Checks: known elements (Z in 1..118), finite positions, cell and labels, label shapes, required labels
(energy and forces; stress and magmoms are optional), no two atoms closer than ``min_distance``, a fully
periodic cell no emptier than ``max_volume_per_atom`` and no atom without a neighbour within ``cutoff``
(``reject_isolated_atoms``; `DataConfig` says why). The distance and neighbour checks reuse the cutoff
neighbour list (``matris.graph``), so they cost no extra pair search. Stress is kept only for fully periodic
structures, where it is defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress

from data_prep.config import DataConfig
from matris.graph import count_triplets, neighbor_graph


class Rejected(Exception):
    """A record that fails validation; ``field`` names the offending quantity."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class StrictModeError(RuntimeError):
    """Raised in strict mode on the first rejected record, naming file, record and field."""

    def __init__(self, source: str, index: int | str, rejected: Rejected):
        super().__init__(f"{source}, record {index}: rejected on {rejected}")
        self.source = source
        self.index = index
        self.field = rejected.field


@dataclass
class Record:
    """One accepted structure: geometry, labels in ASE units and its two-body graph."""

    source: str
    index: int | str
    numbers: np.ndarray  # (n,)
    positions: np.ndarray  # (n, 3)
    cell: np.ndarray  # (3, 3)
    pbc: np.ndarray  # (3,)
    energy: float
    forces: np.ndarray  # (n, 3)
    stress: np.ndarray | None  # (3, 3), eV/Å³, ASE sign
    magmoms: np.ndarray | None  # (n,)
    task: str
    charge: float
    spin: float
    edge_index: np.ndarray  # (2, e), local atom indices
    edge_shift: np.ndarray  # (e, 3)
    n_triplets: int  # line-graph size at the three-body cutoff, for the loader's batch budget


def default_task(source: str | Path, config: DataConfig) -> str:
    """The configured default task, else the file name without its extensions."""
    return config.default_task or Path(source).name.split(".")[0]


def _lookup(atoms: Atoms, store: dict, key: str, prop: str):
    if key in store:
        return store[key]
    results = getattr(atoms.calc, "results", None) or {}
    return results.get(prop)


def _array(value, shape: tuple[int, ...], field: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise Rejected(field, f"not numeric ({error})") from error
    if array.size != math.prod(shape):
        raise Rejected(field, f"wrong shape {array.shape}, expected {shape}")
    array = array.reshape(shape)
    if not np.isfinite(array).all():
        raise Rejected(field, "non-finite value")
    return array


def _scalar(value, field: str, default: float | None = None) -> float:
    if value is None:
        if default is None:
            raise Rejected(field, "missing")
        return default
    return float(_array(value, (1,), field)[0])


def _stress(value) -> np.ndarray:
    if np.size(value) == 6:
        value = voigt_6_to_full_3x3_stress(_array(value, (6,), "stress"))
    return _array(value, (3, 3), "stress")


def check(atoms: Atoms, source: str, index: int | str, config: DataConfig) -> Record:
    """Validate ``atoms`` and build its graph at ``config.cutoff``; raise ``Rejected`` on the first fault."""
    numbers = np.asarray(atoms.numbers, dtype=np.int64)
    n = len(numbers)
    if n == 0:
        raise Rejected("numbers", "structure has no atoms")
    unknown = numbers[(numbers < 1) | (numbers > 118)]
    if unknown.size:
        raise Rejected("numbers", f"unknown element Z={int(unknown[0])}")
    positions = _array(atoms.positions, (n, 3), "positions")
    cell = _array(atoms.cell.array, (3, 3), "cell")
    pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
    if config.max_volume_per_atom is not None and pbc.all():
        volume = abs(float(np.linalg.det(cell)))
        if volume / n > config.max_volume_per_atom:
            raise Rejected(
                "cell",
                f"volume per atom {volume / n:.3g} Å³ above max_volume_per_atom "
                f"{config.max_volume_per_atom:g} Å³ ({n} atoms in {volume:.3g} Å³)",
            )

    energy_value = _lookup(atoms, atoms.info, config.energy_key, "energy")
    energy = _scalar(energy_value, "energy")
    forces_value = _lookup(atoms, atoms.arrays, config.forces_key, "forces")
    if forces_value is None:
        raise Rejected("forces", "missing")
    forces = _array(forces_value, (n, 3), "forces")
    stress_value = _lookup(atoms, atoms.info, config.stress_key, "stress")
    stress = _stress(stress_value) if stress_value is not None and pbc.all() else None
    magmoms_value = _lookup(atoms, atoms.arrays, config.magmoms_key, "magmoms")
    magmoms = None if magmoms_value is None else _array(magmoms_value, (n,), "magmoms")
    charge = _scalar(atoms.info.get(config.charge_key), "charge", default=0.0)
    spin = _scalar(atoms.info.get(config.spin_key), "spin", default=1.0)
    task = str(atoms.info.get(config.task_key) or default_task(source, config))

    try:
        edge_index, edge_shift, distance = neighbor_graph(positions, cell, pbc, config.cutoff)
    except (ValueError, RuntimeError) as error:
        raise Rejected("cell", f"no neighbour list: {error}") from error
    if distance.size and distance.min() < config.min_distance:
        closest = int(np.argmin(distance))
        i, j = edge_index[:, closest]
        raise Rejected(
            "positions",
            f"atoms {int(i)} and {int(j)} are {distance[closest]:.3f} Å apart "
            f"(min_distance {config.min_distance} Å)",
        )
    if config.reject_isolated_atoms:
        isolated = np.flatnonzero(np.bincount(edge_index[0], minlength=n) == 0)
        if isolated.size:
            first = int(isolated[0])
            raise Rejected(
                "positions",
                f"atom {first} ({chemical_symbols[numbers[first]]}) has no neighbour within the cutoff "
                f"{config.cutoff} Å ({isolated.size} of {n} atoms isolated; reject_isolated_atoms)",
            )
    return Record(
        source=source,
        index=index,
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=pbc,
        energy=energy,
        forces=forces,
        stress=stress,
        magmoms=magmoms,
        task=task,
        charge=charge,
        spin=spin,
        edge_index=edge_index,
        edge_shift=edge_shift,
        n_triplets=count_triplets(edge_index[0], distance, n, config.three_body_cutoff),
    )
