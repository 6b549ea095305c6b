"""ASE calculator: energy, forces and (for periodic cells) stress from a MatRIS model or model file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from matris.batch import collate
from matris.graph import graph_from_atoms
from matris.io import load
from matris.model import MatRIS
from matris.properties import predict


class MatRISCalculator(Calculator):
    """``MatRISCalculator(path_or_model, task=NAME)``; ``task`` picks the level of theory to reproduce."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: MatRIS | str | Path, task: str, device: str | torch.device = "cpu", **kwargs):
        super().__init__(**kwargs)
        self.model = (load(model, device) if isinstance(model, str | Path) else model.to(device)).eval()
        tasks = self.model.config.tasks
        if task not in tasks:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(tasks)}")
        self.task, self.task_index, self.device = task, tasks.index(task), torch.device(device)
        self.dtype = next(self.model.parameters()).dtype
        self.trained_elements = self.model.trained_elements(task)
        self._warned: set[int] = set()

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self._warn_unseen(set(self.atoms.numbers.tolist()))
        graph = graph_from_atoms(self.atoms, self.model.config.cutoff, task=self.task_index)
        batch = collate([graph], dtype=self.dtype).to(self.device)
        periodic = bool(self.atoms.pbc.all())
        out = predict(self.model, batch, forces=True, stress=periodic)
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].cpu().numpy().astype(np.float64),
        }
        if periodic:
            stress = out["stress"][0].cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)

    def _warn_unseen(self, numbers: set[int]) -> None:
        """Warn once per element that ``task``'s training split never held: its reference energy is
        unknown (zero), so energies of such structures are not predictions."""
        unseen = sorted(numbers - self.trained_elements - self._warned)
        if unseen:
            self._warned.update(unseen)
            names = ", ".join(chemical_symbols[z] for z in unseen)
            warnings.warn(
                f"MatRISCalculator: element(s) {names} were absent from the training data of task "
                f"{self.task!r}; energies of this structure are unreliable",
                UnseenElementWarning,
                stacklevel=4,
            )


class UnseenElementWarning(UserWarning):
    """A structure holds an element that the model's task never saw in training."""
