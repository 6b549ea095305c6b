"""MPtrj JSON (CHGNet's Materials Project trajectories): ``{mp_id: {frame_id: {structure, ...}}}``.

Each frame becomes one record with id ``"mp_id/frame_id"``. Labels: ``corrected_total_energy`` (eV),
``force`` (eV/Å), ``stress`` in kBar with VASP's sign (compressive positive), converted here to eV/Å³ with
ASE's sign, and ``magmom`` (μB, may be null). The whole JSON is loaded per call: the format has no index.
Structures are pymatgen dicts, read with pymatgen (a dependency: it also builds the neighbour graphs).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

KBAR = 0.1 * units.GPa  # eV/Å³ per kBar


def kbar_vasp_to_ase(stress_kbar) -> np.ndarray:
    """3x3 stress in kBar, VASP sign (positive = compressive) → eV/Å³, ASE sign (positive = tensile)."""
    return -KBAR * np.asarray(stress_kbar, dtype=np.float64).reshape(3, 3)


def load(path: Path) -> dict:
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def frames(data: dict) -> Iterator[tuple[str, object]]:
    for mp_id, trajectory in data.items():
        if not isinstance(trajectory, dict):
            yield str(mp_id), ValueError(f"structure: entry {mp_id} is not a mapping of frames")
            continue
        for frame_id, frame in trajectory.items():
            yield f"{mp_id}/{frame_id}", frame


def frame_atoms(frame: dict) -> Atoms:
    from pymatgen.core import Structure  # here, not at the top: pymatgen.core takes a second to import
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = AseAtomsAdaptor.get_atoms(Structure.from_dict(frame["structure"]))
    results = {"energy": float(frame["corrected_total_energy"]), "forces": np.asarray(frame["force"], float)}
    if frame.get("stress") is not None:
        results["stress"] = full_3x3_to_voigt_6_stress(kbar_vasp_to_ase(frame["stress"]))
    if frame.get("magmom") is not None:
        results["magmoms"] = np.asarray(frame["magmom"], dtype=np.float64)
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def count(path: Path) -> int:
    return sum(1 for _ in frames(load(path)))


def read(
    path: Path, start: int = 0, stop: int | None = None, offset: int | None = None
) -> Iterator[tuple[str, Atoms | Exception]]:
    for record_id, frame in islice(frames(load(path)), start, stop):
        if isinstance(frame, Exception):
            yield record_id, frame
            continue
        try:
            yield record_id, frame_atoms(frame)
        except ImportError:
            raise
        except Exception as error:  # a frame missing a field or with a broken structure is quarantined
            yield record_id, ValueError(f"{type(error).__name__}: {error}")
