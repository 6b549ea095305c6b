"""Short NVE molecular dynamics as a stability check of a potential, through ASE.

A potential can score well on held-out single points and still be unusable in MD: a non-conservative or
rough energy surface makes the total energy drift, and a surface with holes lets atoms fall onto each
other. Velocity Verlet without a thermostat exposes both within a few hundred femtoseconds, so each run
reports the drift of the total energy per atom (slope of a straight-line fit, meV/atom/ps) and whether it
stayed physical (finite energies and forces, no two atoms closer than ``min_distance``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from matris.graph import neighbor_graph

PROBE = 3.0  # Å: pairs closer than this are searched for the smallest distance


@dataclass
class MDResult:
    """One NVE run; ``steps`` is how many were run (fewer than ``requested_steps`` if it went unphysical)."""

    task: str
    formula: str
    n_atoms: int
    periodic: bool
    requested_steps: int
    steps: int
    timestep_fs: float
    temperature_k: float
    seed: int
    drift_mev_per_atom_per_ps: float | None
    max_deviation_mev_per_atom: float | None
    min_distance_a: float | None
    final_temperature_k: float | None
    stable: bool
    reason: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_nve(
    atoms: Atoms,
    calculator: Calculator,
    task: str,
    steps: int = 200,
    timestep_fs: float = 1.0,
    temperature_k: float = 300.0,
    seed: int = 0,
    min_distance: float = 0.5,
) -> MDResult:
    """NVE Velocity Verlet from Maxwell-Boltzmann velocities at ``temperature_k`` (seeded, no net momentum;
    no net rotation for a molecule), checking every step."""
    start = time.perf_counter()
    atoms = atoms.copy()
    atoms.calc = calculator
    periodic = bool(atoms.pbc.all())
    thermalize_momenta(atoms, temperature_K=temperature_k, rng=np.random.default_rng(seed))
    Stationary(atoms)
    if not periodic:
        ZeroRotation(atoms)
    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    energies, closest, reason, done = [], [], "", 0
    while True:
        energy = atoms.get_potential_energy() + atoms.get_kinetic_energy()
        if not (np.isfinite(energy) and np.isfinite(atoms.get_forces()).all()):
            reason = f"non-finite energy or forces at step {done}"
            break
        energies.append(energy)
        closest.append(smallest_distance(atoms))
        if closest[-1] < min_distance:
            reason = f"atoms {closest[-1]:.2f} Å apart at step {done} (limit {min_distance} Å)"
            break
        if done == steps:
            break
        dynamics.run(1)
        done += 1
    per_atom = (np.array(energies) - energies[0]) * 1000 / len(atoms) if energies else np.zeros(0)
    drift = None
    if len(per_atom) > 1:
        times_ps = np.arange(len(per_atom)) * timestep_fs / 1000
        drift = float(np.polyfit(times_ps, per_atom, 1)[0])
    return MDResult(
        task=task,
        formula=atoms.get_chemical_formula(),
        n_atoms=len(atoms),
        periodic=periodic,
        requested_steps=steps,
        steps=done,
        timestep_fs=timestep_fs,
        temperature_k=temperature_k,
        seed=seed,
        drift_mev_per_atom_per_ps=drift,
        max_deviation_mev_per_atom=float(np.abs(per_atom).max()) if len(per_atom) else None,
        min_distance_a=min(closest) if closest else None,
        final_temperature_k=float(atoms.get_temperature()) if not reason else None,
        stable=not reason,
        reason=reason,
        seconds=time.perf_counter() - start,
    )


def smallest_distance(atoms: Atoms) -> float:
    """Shortest interatomic distance, periodic images included (``PROBE`` if none is shorter)."""
    if not np.isfinite(atoms.positions).all():
        return float("nan")
    distance = neighbor_graph(atoms.positions, atoms.cell.array, atoms.pbc, PROBE).distance
    return float(distance.min()) if distance.size else PROBE


def describe(record: dict[str, Any]) -> str:
    """One printed line per MD run (``record`` is an ``MDResult.as_dict()``, e.g. read from metrics.json)."""
    kind = "periodic" if record["periodic"] else "molecule"
    head = (
        f"MD {record['task']} {record['formula']} ({record['n_atoms']} atoms, {kind}): "
        f"{record['steps']}/{record['requested_steps']} steps × {record['timestep_fs']:g} fs NVE from "
        f"{record['temperature_k']:g} K"
    )
    if not record["stable"]:
        return f"{head}: UNSTABLE, {record['reason']} ({record['seconds']:.1f} s)"
    drift = record["drift_mev_per_atom_per_ps"]
    drift_text = "n/a" if drift is None else f"{drift:+.3g} meV/atom/ps"
    return (
        f"{head}: drift {drift_text}, max |ΔE| {record['max_deviation_mev_per_atom']:.3g} meV/atom, "
        f"closest pair {record['min_distance_a']:.2f} Å, T_end {record['final_temperature_k']:.0f} K: "
        f"stable ({record['seconds']:.1f} s)"
    )
