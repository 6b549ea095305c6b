"""Inference artifact for MD codes: one ``torch.export`` program giving the energy and its pair gradients.

    python -m janus.export --model RUN/export/model.safetensors --deploy RUN/export/model.pt2

The ``.pt2`` file loads with ``torch.export.load(path).module()`` in any process that has PyTorch (no
matris needed); its ``matris.json`` extra file holds the cutoff, task vocabulary, dtype and, for a pruned
model, the allowed elements. Inputs, for one structure:

    atomic_numbers (n,) int64 · edge_index (2, e) int64, centre i then neighbour j, every ordered pair closer
    than the cutoff · edge_vectors (e, 3) r_j + shift·cell − r_i in Å · task (1,) int64 · charge_spin (2,)
    charge and spin multiplicity

and outputs ``energy`` (1,) in eV and ``dE/d(edge_vectors)`` (e, 3) in eV/Å. The model sees positions
only through these vectors, so the pair gradients g give exact forces, F_i = Σ_{i→j} g − Σ_{j→i} g, and
the virial, σ = Σ v ⊗ g / V (ASE's sign). Pair vectors in and pair gradients out is what MD engines hand
to and take from a potential. The backward pass is traced into the program (first-order only: no double
backward is needed at inference), so a consumer needs no autograd of its own.

Which engines can load it:

- ASE: `DeployedCalculator` below; tested against `MatRISCalculator` (tests/test_evaluate_export.py).
- TorchSim (``torch-sim-atomistic``): a ``ModelInterface`` whose ``forward`` builds the pair list and calls
  the program. Not tested here: its install pulls compiled packages (tables, blosc2, numexpr).
- LAMMPS ML-IAP "unified" (Python) passes exactly pair vectors and takes pair gradients
  (``update_pair_forces``); single-domain runs fit as is, but a multi-layer message-passing model needs
  the ghost-atom feature exchange of newer ML-IAP across MPI domains. Not tested: Debian's LAMMPS (2022)
  has no ML-IAP Python interface.
- C++ codes: the exported program can be compiled by AOTInductor (``torch._inductor.aoti_compile_and_
  package``); not tried.

Why this route (torch 2.13). ``torch.jit.script(MatRIS)`` fails: ``LineAttention`` in `matris.layers`
builds a size as ``new_zeros(e, *v.shape[1:])``, which TorchScript cannot type, and ``forward`` takes
dataclasses. ``torch.export`` of ``MatRIS.forward`` fails on sizes read from the data as Python ints: the
MoE capacity ``int(counts.max())`` (`matris.moe`), the line-graph construction in `matris.model`
(``repeat_interleave`` without ``output_size``; dense triplet blocks sized from the degrees), and
``batch.num_atoms`` in the balance loss, which pins the atom count. ``torch.autograd.grad`` inside
``torch.export`` fails too (non-strict: "fake tensor in the exported program constant's list"; strict
with ``trace_autograd_ops``: the gradient comes out as a FakeTensor and the archive does not reload).
What works: an inference twin that reuses the model's modules and parameters but (1) dispatches MoE
tokens with one ``nonzero`` per expert instead of a padded capacity and (2) builds the triplet list with
``output_size`` hints (the list form of `matris.model.Geometry`), traced with its backward by ``make_fx``
(symbolic shapes); that aten graph, which holds no autograd calls, is then exported with dynamic atom and
edge counts. Cost for the ``tiny`` preset on 2 busy cores: about 30 s to trace and export, 10 s to load;
the program needs at least 2 atoms and 2 pairs.
"""

from __future__ import annotations

import copy
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from torch import nn
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from matris.batch import Batch
from matris.graph import neighbor_graph
from matris.layers import legendre, polynomial_envelope
from matris.model import Geometry, MatRIS
from matris.moe import MoE
from matris.prune import ALLOWED, symbols

FORMAT = "matris-deploy"
VERSION = "1"
META = "matris.json"


class ExportMoE(MoE):
    """The same routed experts, dispatched one expert at a time over the rows routed to it.

    ``MoE.forward`` packs tokens into a (experts, capacity, dim) tensor whose capacity is a Python int read
    from the data, which an exported program cannot hold; a ``nonzero`` per expert gives the same sums with
    sizes the program keeps symbolic. Routing statistics are not needed at inference and come back as zeros.
    """

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        experts, weights = self.route(z)
        w1, w3, w2 = self.experts.w1, self.experts.w3, self.experts.w2
        y = x.new_zeros(x.shape)
        for e in range(self.num_experts):
            token, slot = torch.nonzero(experts == e, as_tuple=True)
            rows = x[token]
            out = (F.silu(rows @ w1[e]) * (rows @ w3[e])) @ w2[e]
            y = y.index_add(0, token, out * weights[token, slot].unsqueeze(-1))
        if self.shared is not None:
            y = y + self.shared(x)
        zeros = x.new_zeros(self.num_experts)
        return y, zeros, zeros


def line_graph(
    edge_index: torch.Tensor, length: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`matris.model.line_graph` with every ``repeat_interleave`` told its output size, so that the traced
    program can prove the index arithmetic's sizes agree."""
    short = torch.nonzero(length < cutoff).squeeze(-1)
    centre = edge_index[0, short]
    order = torch.argsort(centre, stable=True)
    short, centre = short[order], centre[order]
    m = short.shape[0]
    _, degree = torch.unique_consecutive(centre, return_counts=True)
    run_start = (degree.cumsum(0) - degree).repeat_interleave(degree, output_size=m)
    run_length = degree.repeat_interleave(degree, output_size=m)
    a = torch.arange(m, device=short.device).repeat_interleave(run_length)
    b = run_start[a] + torch.arange(a.shape[0], device=a.device) - (run_length.cumsum(0) - run_length)[a]
    keep = a != b
    return short[a[keep]], short[b[keep]]


class InferenceGraph(nn.Module):
    """Energy and pair gradients of one structure from pair vectors (the program's inputs, see module doc).

    Mirrors ``MatRIS.geometry`` and ``MatRIS.forward`` from the bond vectors on; the embedding, blocks and
    heads are the model's own modules, so the parity test in tests/test_evaluate_export.py is what keeps
    the mirror honest.
    """

    def __init__(self, model: MatRIS):
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for module in self.model.modules():
            if type(module) is MoE:
                module.__class__ = ExportMoE

    def forward(
        self,
        atomic_numbers: torch.Tensor,
        edge_index: torch.Tensor,
        edge_vectors: torch.Tensor,
        task: torch.Tensor,
        charge_spin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model, config, z = self.model, self.model.config, atomic_numbers
        vectors = edge_vectors.detach().requires_grad_(True)
        with torch.enable_grad():
            length = vectors.norm(dim=-1)
            target, source = line_graph(edge_index, length, config.three_body_cutoff)
            cosine = (vectors[target] * vectors[source]).sum(-1) / (length[target] * length[source])
            switch = polynomial_envelope(length, config.three_body_cutoff)
            triplet_envelope = switch[target] * switch[source]
            geometry = Geometry(
                z=z,
                centre=edge_index[0],
                neighbour=edge_index[1],
                envelope=polynomial_envelope(length, config.cutoff),
                triplet_target=target,
                triplet_source=source,
                angle=legendre(cosine, config.num_angular) * triplet_envelope.unsqueeze(-1),
                triplet_envelope=triplet_envelope,
            )
            # `embed` reads the elements, task, charge, spin and atom count; the geometry fields are unused.
            batch = Batch(
                atomic_numbers=z,
                positions=vectors.new_zeros(z.shape[0], 3),
                cell=vectors.new_zeros(1, 3, 3),
                pbc=z.new_zeros(1, 3).bool(),
                atom_structure=torch.zeros_like(z),
                n_atoms=torch.ones_like(z).sum().view(1),
                edge_index=edge_index,
                edge_shift=vectors.detach(),
                task=task,
                charge=charge_spin[:1],
                spin=charge_spin[1:],
            )
            atoms, bonds = model.embed(batch), model.embed_bond(model.radial(length))
            for block in model.blocks:
                atoms, bonds, _ = block(atoms, bonds, geometry)
            atom_energy = model.energy_head(model.norm(atoms)).squeeze(-1)
            energy = (atom_energy + model.reference_energy[task.expand(z.shape[0]), z]).sum()
            (gradient,) = torch.autograd.grad(energy, [vectors])
        return energy.detach().view(1), gradient


class _Program(nn.Module):
    """Holds the traced aten graph so that torch.export sees a module with named inputs."""

    def __init__(self, traced: nn.Module):
        super().__init__()
        # Not named ``graph``: the unlifted GraphModule's own ``graph`` attribute would shadow it.
        self.traced = traced

    def forward(self, atomic_numbers, edge_index, edge_vectors, task, charge_spin):
        return self.traced(atomic_numbers, edge_index, edge_vectors, task, charge_spin)


def build(model: MatRIS) -> torch.export.ExportedProgram:
    """Trace the inference graph of ``model`` (backward included) and export it with dynamic sizes."""
    dtype = next(model.parameters()).dtype
    example = edge_inputs(_example_structure(model), model.config.cutoff, dtype)
    graph = InferenceGraph(model)
    with warnings.catch_warnings(), fx_config.patch(use_duck_shape=False):
        warnings.simplefilter("ignore")
        traced = make_fx(graph, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
        atoms, edges = Dim("atoms", min=2, max=10_000_000), Dim("edges", min=2, max=1_000_000_000)
        return torch.export.export(
            _Program(traced),
            example,
            dynamic_shapes=({0: atoms}, {1: edges}, {0: edges}, None, None),
            strict=False,
        )


def write_artifact(model: MatRIS, path: Path, source: Path | None = None) -> Path:
    """Export ``model``'s inference program to ``path`` (.pt2) with its metadata."""
    path = Path(path)
    allowed = getattr(model, ALLOWED, None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "cutoff": model.config.cutoff,
        "tasks": model.config.tasks,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "allowed_elements": None if allowed is None else allowed.tolist(),
        "source": None if source is None else str(source),
    }
    program = build(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.pt2")  # torch.export wants the .pt2 suffix
    torch.export.save(program, tmp, extra_files={META: json.dumps(meta)})
    tmp.replace(path)
    return path


def load_artifact(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The callable program and its metadata; refuses files that are not MatRIS inference artifacts."""
    if not zipfile.is_zipfile(path):  # checked first: torch.export.load logs tracebacks before it raises
        raise ValueError(f"{path} is not a readable torch.export artifact (not a .pt2 archive)")
    extra = {META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(path, extra_files=extra)
        meta = json.loads(extra[META] or "{}")
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable torch.export artifact: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = f"{meta.get('format')!r} version {meta.get('version')!r}"
        raise ValueError(f"{path} is not a MatRIS inference artifact version {VERSION} (found {found})")
    return program.module(), meta


def edge_inputs(atoms: Atoms, cutoff: float, dtype: torch.dtype, task: int = 0) -> tuple[torch.Tensor, ...]:
    """The program's inputs for ``atoms``: the same pair list as training (`matris.graph`)."""
    edge_index, shift, _ = neighbor_graph(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    i, j = edge_index
    vectors = atoms.positions[j] + shift @ atoms.cell.array - atoms.positions[i]
    return (
        torch.from_numpy(atoms.numbers.astype(np.int64)),
        torch.from_numpy(edge_index),
        torch.from_numpy(vectors).to(dtype),
        torch.tensor([task], dtype=torch.long),
        torch.tensor([atoms.info.get("charge", 0.0), atoms.info.get("spin", 1.0)], dtype=dtype),
    )


def _example_structure(model: MatRIS) -> Atoms:
    """A small mixed periodic cell (31 atoms, a vacancy) to trace with; sizes are symbolic afterwards."""
    allowed = getattr(model, ALLOWED, None)
    elements = allowed.tolist() if allowed is not None else [1, 6, 8, 29]
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    del atoms[0]
    atoms.numbers = [elements[k % len(elements)] for k in range(len(atoms))]
    atoms.rattle(0.05, seed=0)
    return atoms


class DeployedCalculator(Calculator):
    """ASE calculator over an inference artifact: ``DeployedCalculator("model.pt2", task=NAME)``; pass
    ``load_artifact(path)`` instead of the path to share one loaded program between tasks."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, artifact: str | Path | tuple[nn.Module, dict[str, Any]], task: str, **kwargs):
        super().__init__(**kwargs)
        loaded = artifact if isinstance(artifact, tuple) else load_artifact(Path(artifact))
        self.program, self.meta = loaded
        if task not in self.meta["tasks"]:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(self.meta['tasks'])}")
        self.task_index = self.meta["tasks"].index(task)
        self.dtype = getattr(torch, self.meta["dtype"])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        allowed = self.meta["allowed_elements"]
        if allowed is not None and not set(self.atoms.numbers.tolist()) <= set(allowed):
            other = sorted(set(self.atoms.numbers.tolist()) - set(allowed))
            raise ValueError(f"this model was pruned to elements {symbols(allowed)}; the structure also "
                             f"contains {symbols(other)}")  # fmt: skip
        inputs = edge_inputs(self.atoms, self.meta["cutoff"], self.dtype, self.task_index)
        if len(self.atoms) < 2 or inputs[1].shape[1] < 2:
            raise ValueError("the inference artifact needs at least 2 atoms and 2 pairs within the cutoff")
        energy, gradient = self.program(*inputs)
        edge_index, vectors, g = inputs[1].numpy(), inputs[2].double().numpy(), gradient.double().numpy()
        forces = np.zeros((len(self.atoms), 3))
        np.add.at(forces, edge_index[0], g)
        np.add.at(forces, edge_index[1], -g)
        self.results = {"energy": float(energy[0]), "free_energy": float(energy[0]), "forces": forces}
        if self.atoms.pbc.all():
            virial = vectors.T @ g
            stress = 0.5 * (virial + virial.T) / self.atoms.get_volume()
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
