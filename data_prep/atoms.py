"""Read prepared shards back as ``ase.Atoms`` (``data_prep.iter_atoms``: what evaluation and peers read)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from data_prep import manifest, shards


def iter_atoms(data_dir: str | Path, split: str | None = None) -> Iterator[Atoms]:
    """Every stored structure (of ``split`` when given), in manifest shard order.

    Labels are calculator results in ASE units (energy eV, forces eV/Å, stress eV/Å³ as ASE's Voigt
    6-vector with ASE's sign, magmoms μB); absent labels are absent. ``info`` holds ``task`` (name),
    ``charge``, ``spin``, and ``source``/``index`` naming the input record.
    """
    data_dir = Path(data_dir)
    for entry in manifest.read(data_dir)["shards"]:
        if split is not None and entry["split"] != split:
            continue
        arrays, attrs = shards.load(data_dir / entry["file"])
        atom_offset, edge_offset = arrays["atom_offset"], arrays["edge_offset"]
        for k in range(int(attrs["n_structures"])):
            s = shards.structure(arrays, k, atom_offset, edge_offset)
            atoms = Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
            results = {"energy": float(s["energy"]), "forces": s["forces"]}
            if s["has_stress"]:
                results["stress"] = full_3x3_to_voigt_6_stress(s["stress"])
            if s["has_magmoms"]:
                results["magmoms"] = s["magmoms"]
            atoms.calc = SinglePointCalculator(atoms, **results)
            record_id = str(arrays["record_id"][k])
            atoms.info.update(
                task=attrs["tasks"][int(s["task"])],
                charge=float(s["charge"]),
                spin=float(s["spin"]),
                source=str(attrs["source"]),
                index=int(record_id) if attrs["index_type"] == "int" else record_id,
            )
            yield atoms
