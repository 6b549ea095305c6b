"""The model's input: a batch of structures concatenated into one disjoint graph.

This is the one contract between data loading (``data_prep.loader``), the calculator and the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from matris.graph import StructureGraph


@dataclass
class Batch:
    """Structures of a batch stacked atom-wise, with edges re-indexed into the stacked atoms.

    Atom-level tensors have ``n`` rows, edge-level ``e`` rows, structure-level ``b`` rows. Label tensors
    are ``None`` when no structure in the batch carries them; ``has_stress`` marks which do.
    """

    atomic_numbers: torch.Tensor  # (n,) long
    positions: torch.Tensor  # (n, 3)
    cell: torch.Tensor  # (b, 3, 3)
    pbc: torch.Tensor  # (b, 3) bool
    atom_structure: torch.Tensor  # (n,) long: index of each atom's structure
    n_atoms: torch.Tensor  # (b,) long
    edge_index: torch.Tensor  # (2, e) long: centre i, neighbour j
    edge_shift: torch.Tensor  # (e, 3) float: cell shifts of j
    task: torch.Tensor  # (b,) long
    charge: torch.Tensor  # (b,)
    spin: torch.Tensor  # (b,)
    energy: torch.Tensor | None = None  # (b,) eV
    forces: torch.Tensor | None = None  # (n, 3) eV/Å
    stress: torch.Tensor | None = None  # (b, 3, 3) eV/Å³, ASE sign
    has_stress: torch.Tensor | None = None  # (b,) bool
    magmoms: torch.Tensor | None = None  # (n,) μB
    has_magmoms: torch.Tensor | None = None  # (b,) bool

    @property
    def num_structures(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """Move to ``device``; floating tensors also take ``dtype`` when given."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(device=device, dtype=dtype)
                else:
                    value = value.to(device=device)
            moved[f.name] = value
        return replace(self, **moved)


def collate(structures: Sequence[StructureGraph], dtype: torch.dtype = torch.float32) -> Batch:
    """Stack structures into one ``Batch``; edge indices are offset by the atoms before them."""
    if not structures:
        raise ValueError("cannot collate an empty list of structures")
    n_atoms = np.array([s.n_atoms for s in structures], dtype=np.int64)
    atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    edge_index = np.concatenate(
        [s.edge_index + off for s, off in zip(structures, atom_offset, strict=True)], axis=1
    )

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(s, name) for s in structures])

    def floats(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

    has_energy = all(s.energy is not None for s in structures)
    has_forces = all(s.forces is not None for s in structures)
    has_stress = np.array([s.stress is not None for s in structures])
    has_magmoms = np.array([s.magmoms is not None for s in structures])
    stress = np.stack([s.stress if s.stress is not None else np.zeros((3, 3)) for s in structures])
    magmoms = np.concatenate(
        [s.magmoms if s.magmoms is not None else np.zeros(s.n_atoms) for s in structures]
    )
    return Batch(
        atomic_numbers=torch.from_numpy(cat("atomic_numbers").astype(np.int64)),
        positions=floats(cat("positions")),
        cell=floats(np.stack([s.cell for s in structures])),
        pbc=torch.from_numpy(np.stack([s.pbc for s in structures]).astype(bool)),
        atom_structure=torch.from_numpy(np.repeat(np.arange(len(structures)), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms),
        edge_index=torch.from_numpy(edge_index.astype(np.int64)),
        edge_shift=floats(cat("edge_shift")),
        task=torch.tensor([s.task for s in structures], dtype=torch.long),
        charge=torch.tensor([s.charge for s in structures], dtype=dtype),
        spin=torch.tensor([s.spin for s in structures], dtype=dtype),
        energy=torch.tensor([s.energy for s in structures], dtype=dtype) if has_energy else None,
        forces=floats(cat("forces")) if has_forces else None,
        stress=floats(stress) if has_stress.any() else None,
        has_stress=torch.from_numpy(has_stress) if has_stress.any() else None,
        magmoms=floats(magmoms) if has_magmoms.any() else None,
        has_magmoms=torch.from_numpy(has_magmoms) if has_magmoms.any() else None,
    )
