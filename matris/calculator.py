"""ASE calculator: energy, forces and (for periodic cells) stress from a MatRIS model or model file."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
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

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
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
