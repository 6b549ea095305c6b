"""Short NVE molecular dynamics as a stability check of a potential, through ASE.

A potential can score well on held-out single points and still be unusable in MD: a non-conservative or
rough energy surface makes the total energy drift, and a surface with holes lets atoms fall onto each
other. Velocity Verlet without a thermostat exposes both within a few hundred femtoseconds, so each run
reports the drift of the total energy per atom (slope of a straight-line fit, meV/atom/ps) and calls the
run stable only if every bound held:

- finite energies and forces;
- the closest pair stays above ``CLOSEST_PAIR_FLOOR`` of the starting structure's closest pair (and above
  ``min_distance``): a collapsed cell can conserve energy perfectly while its atoms sit on each other;
- the drift stays within ``MAX_DRIFT_MEV_PER_ATOM_PS``;
- the temperature stays below ``MAX_TEMPERATURE_FACTOR`` times the starting temperature (a fall into a
  hole of the surface turns its depth into heat).

``reason`` names every bound that failed.
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
CLOSEST_PAIR_FLOOR = 0.6  # of the starting closest pair; thermal motion at 300 K shortens it by ~10 %
MAX_DRIFT_MEV_PER_ATOM_PS = 50.0  # |slope| of the total energy per atom
MAX_TEMPERATURE_FACTOR = 10.0  # of the starting temperature


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
    closest_pair_floor_a: float
    final_temperature_k: float | None
    max_temperature_k: float | None
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
    floor = max(min_distance, CLOSEST_PAIR_FLOOR * smallest_distance(atoms))
    hottest = MAX_TEMPERATURE_FACTOR * temperature_k
    energies, closest, temperatures, failed, done = [], [], [], [], 0
    while True:
        energy = atoms.get_potential_energy() + atoms.get_kinetic_energy()
        if not (np.isfinite(energy) and np.isfinite(atoms.get_forces()).all()):
            failed.append(f"non-finite energy or forces at step {done}")
            break
        energies.append(energy)
        closest.append(smallest_distance(atoms))
        temperatures.append(float(atoms.get_temperature()))
        if closest[-1] < floor:
            failed.append(f"closest pair {closest[-1]:.2f} Å at step {done}, below the floor {floor:.2f} Å")
            break
        if temperatures[-1] > hottest:
            failed.append(f"temperature {temperatures[-1]:.0f} K at step {done}, above {hottest:.0f} K")
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
        if abs(drift) > MAX_DRIFT_MEV_PER_ATOM_PS:
            failed.append(f"energy drift {drift:+.3g} meV/atom/ps beyond ±{MAX_DRIFT_MEV_PER_ATOM_PS:g}")
    reason = "; ".join(failed)
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
        closest_pair_floor_a=floor,
        final_temperature_k=temperatures[-1] if temperatures else None,
        max_temperature_k=max(temperatures) if temperatures else None,
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
        f"closest pair {record['min_distance_a']:.2f} Å (floor {record['closest_pair_floor_a']:.2f}), "
        f"T_end {record['final_temperature_k']:.0f} K: stable ({record['seconds']:.1f} s)"
    )
