"""FSGP: one structure's graph partitioned over the ranks of a graph group, with exchanged ghost atoms.

Each rank *owns* a spatial part of the structure (`janus.batching.partition`) and computes the edges whose
centre it owns, hence the line-graph triplets around its own atoms and the per-atom layers (MoE included)
of its own atoms. An edge i → j with j owned elsewhere needs j's features: j is a *ghost* on this rank.
MatRIS reads neighbour features twice per interaction block (the atom features entering the bond
refinement and the MoE-updated ``source`` entering atom attention), so ghosts are refreshed at both
points with an all-to-all of owned rows (`Halo`). The exchange is twice differentiable, so forces (first
backward, ``create_graph=True``) and parameter gradients (second backward) cross ranks exactly like the
features did; every rank's receptive field therefore equals the unsharded one, whatever the number of
blocks. Ghost positions are copies (leaves): the force on an atom is its own position gradient plus the
gradients of its ghost copies, sent back to its owner (`Halo.reverse`, differentiable for the loss).

The model stays single-device code. Its input on a rank lists the owned atoms first, then the ghosts, and
the ghosts form *twin structures* (structure ``b + k`` for ghosts of local structure ``k``) whose energy is
discarded: the readout sums owned atoms only, without any change to the model. Positions enter as the
owned positions plus their ghost copies, both leaves of the force backward. Forward hooks do the rest:
the block and atom-attention inputs get their ghost rows refreshed, and the composition embedding gets
the full structure's composition. Energies, virials and forces of a partitioned structure are summed
over the group (a differentiable all-reduce) on the rank that holds its loss term.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from janus.batching import RankWork
from janus.parallel import StepContext, all_reduce_sum, all_to_all, exchange, transfer
from matris.batch import Batch
from matris.graph import StructureGraph
from matris.properties import inputs as model_inputs
from matris.properties import stress_from_virial


class Halo:
    """Ghost-atom exchange inside a graph group: owned rows others need → this rank's ghost rows."""

    def __init__(self, send_index: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any):
        self.send_index, self.send_splits, self.recv_splits, self.group = (
            send_index,
            send_splits,
            recv_splits,
            group,
        )
        self.n_owned = 0
        self.bytes_sent = 0  # communication volume of the exchanges since the last reset

    @property
    def num_ghosts(self) -> int:
        return sum(self.recv_splits)

    def exchange(self, owned: torch.Tensor) -> torch.Tensor:
        rows = owned.index_select(0, self.send_index)
        self.bytes_sent += rows.numel() * rows.element_size()
        return exchange(rows, self.recv_splits, self.send_splits, self.group)

    def copy(self, owned: torch.Tensor) -> torch.Tensor:
        """Ghost rows of ``owned``, outside autograd."""
        rows = owned.detach().index_select(0, self.send_index)
        self.bytes_sent += rows.numel() * rows.element_size()
        return transfer(rows, self.recv_splits, self.send_splits, self.group)

    def reverse(self, ghost: torch.Tensor) -> torch.Tensor:
        """Sum of ghost-row values onto their owners' rows (the transpose of `exchange`), differentiable."""
        back = all_to_all(ghost, self.send_splits, self.recv_splits, self.group)
        self.bytes_sent += back.numel() * back.element_size()
        return back.new_zeros(self.n_owned, *back.shape[1:]).index_add(0, self.send_index, back)

    def refresh(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (owned + ghost rows) with the ghost rows replaced by their owners' current values."""
        owned = x[: self.n_owned]
        return torch.cat([owned, self.exchange(owned)])


@dataclass
class GraphStep:
    """One rank's model input and the index maps that assemble its loss predictions."""

    batch: Batch  # owned atoms then ghosts; structures: local ones then their ghost twins
    num_local: int  # local structures b: partitioned pieces first, then whole structures
    num_pieces: int
    n_owned: int
    piece_rows: int  # owned rows [0, piece_rows) belong to pieces, the rest to whole structures
    halo: Halo
    composition: torch.Tensor  # (2b, max_z + 1)
    pack_size: int
    pack_index: torch.Tensor  # where this rank's piece contributions go in the packed group vector
    loss_energy: torch.Tensor  # packed positions of the owned partitioned structures' energies
    loss_virial: torch.Tensor
    loss_forces: torch.Tensor
    loss_magmoms: torch.Tensor


def build_step(
    graphs: dict[int, StructureGraph],
    work: RankWork,
    parts: dict[int, np.ndarray],
    group_size: int,
    group: Any,
    num_z: int,
    dtype: torch.dtype,
    device: torch.device,
) -> GraphStep:
    """Local atoms and edges, ghost exchange plan and loss index maps of ``work`` on its graph rank.

    Every rank of the group derives the same partition and hence matching send and receive lists: ghosts
    are ordered by (owner rank, partitioned structure, atom index), and so is what an owner sends.
    """
    r, pieces, whole = work.graph_rank, work.partitioned, work.whole
    owned = [np.flatnonzero(parts[i] == r) for i in pieces] + [np.arange(graphs[i].n_atoms) for i in whole]
    counts = [len(o) for o in owned]
    plan = _GhostPlan(graphs, pieces + whole, len(pieces), parts, owned, r, group_size)
    longs = partial(torch.tensor, dtype=torch.long, device=device)
    batch, composition = _local_batch(graphs, pieces + whole, owned, plan, parts, r, num_z, dtype, device)
    pack_size, pack, loss = _loss_slots(graphs, pieces, owned, work, r)
    halo = Halo(longs(plan.send_rows), plan.send_splits, plan.recv_splits, group)
    halo.n_owned = sum(counts)
    return GraphStep(
        batch=batch,
        num_local=len(owned),
        num_pieces=len(pieces),
        n_owned=halo.n_owned,
        piece_rows=sum(counts[: len(pieces)]),
        halo=halo,
        composition=composition,
        pack_size=pack_size,
        pack_index=longs(pack),
        loss_energy=longs(loss[0]),
        loss_virial=longs(loss[1]),
        loss_forces=longs(loss[2]),
        loss_magmoms=longs(loss[3]),
    )


class _GhostPlan:
    """Where each atom of this rank's structures sits in its input (``local_of``: owned rows first, then
    ghosts), which ghosts come from which rank, and which owned rows go to which rank."""

    def __init__(self, graphs: dict[int, StructureGraph], local_ids: list[int], num_pieces: int,
                 parts: dict[int, np.ndarray], owned: list[np.ndarray], r: int, group_size: int):  # fmt: skip
        pieces = local_ids[:num_pieces]
        self.num_pieces = num_pieces
        offset = np.concatenate([[0], np.cumsum([len(o) for o in owned])]).astype(np.int64)
        self.local_of = [np.full(graphs[i].n_atoms, -1, dtype=np.int64) for i in local_ids]
        for k, atoms in enumerate(owned):
            self.local_of[k][atoms] = offset[k] + np.arange(len(atoms))
        # Who needs which atom: (needer part, atom) over the edges crossing parts, per partitioned structure.
        needs = []
        for i in pieces:
            part, (centre, neighbour) = parts[i], graphs[i].edge_index
            cross = part[centre] != part[neighbour]
            n = graphs[i].n_atoms
            key = np.unique(part[centre[cross]] * n + neighbour[cross])
            needs.append((key // n, key % n))
        self.ghost_atoms: list[tuple[int, np.ndarray]] = []
        self.recv_splits, self.send_splits = [0] * group_size, [0] * group_size
        send_rows, next_ghost = [], int(offset[-1])
        for q in range(group_size):
            for k, i in enumerate(pieces):
                needer, atom = needs[k]
                if q != r:
                    theirs = atom[(needer == r) & (parts[i][atom] == q)]  # my ghosts owned by q
                    self.local_of[k][theirs] = next_ghost + np.arange(len(theirs))
                    next_ghost += len(theirs)
                    self.recv_splits[q] += len(theirs)
                    self.ghost_atoms.append((k, theirs))
                    mine = atom[(needer == q) & (parts[i][atom] == r)]  # my atoms that are ghosts on q
                    send_rows.append(self.local_of[k][mine])
                    self.send_splits[q] += len(mine)
        self.send_rows = _cat(send_rows, (0,), np.int64)


def _cat(arrays: Sequence[np.ndarray], shape: tuple[int, ...], kind: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(kind) if arrays else np.zeros(shape, dtype=kind)


def _local_batch(
    graphs: dict[int, StructureGraph], local_ids: list[int], owned: list[np.ndarray], plan: _GhostPlan,
    parts: dict[int, np.ndarray], r: int, num_z: int, dtype: torch.dtype, device: torch.device,
) -> tuple[Batch, torch.Tensor]:  # fmt: skip
    """The model input (owned atoms, then ghosts as twin structures ``b + k``) and the full structures'
    element fractions, twins included."""
    z, pos, structure, rows_edges, rows_shift = [], [], [], [], []
    for k, i in enumerate(local_ids):
        g = graphs[i]
        z.append(g.atomic_numbers[owned[k]])
        pos.append(g.positions[owned[k]])
        structure.append(np.full(len(owned[k]), k))
        centre, neighbour = g.edge_index
        mask = parts[i][centre] == r if k < plan.num_pieces else np.ones(len(centre), dtype=bool)
        edges = np.stack([plan.local_of[k][centre[mask]], plan.local_of[k][neighbour[mask]]])
        if edges.size and edges.min() < 0:
            raise RuntimeError("graph partition lost a neighbour of an owned atom")
        rows_edges.append(edges)
        rows_shift.append(g.edge_shift[mask])
    b = len(local_ids)
    ghost_count = np.zeros(b, dtype=np.int64)
    for k, atoms in plan.ghost_atoms:
        g = graphs[local_ids[k]]
        z.append(g.atomic_numbers[atoms])
        pos.append(g.positions[atoms])
        structure.append(np.full(len(atoms), b + k))
        ghost_count[k] += len(atoms)
    twice = local_ids + local_ids
    floats = partial(torch.tensor, dtype=dtype, device=device)
    longs = partial(torch.tensor, dtype=torch.long, device=device)
    batch = Batch(
        atomic_numbers=longs(_cat(z, (0,), np.int64)),
        positions=floats(_cat(pos, (0, 3), np.float64)),
        cell=floats(np.stack([graphs[i].cell for i in twice]).reshape(-1, 3, 3)),
        pbc=torch.tensor(
            np.stack([graphs[i].pbc for i in twice]).reshape(-1, 3), dtype=torch.bool, device=device
        ),
        atom_structure=longs(_cat(structure, (0,), np.int64)),
        n_atoms=longs(np.concatenate([[len(o) for o in owned], np.maximum(ghost_count, 1)]).astype(np.int64)),
        edge_index=longs(np.concatenate(rows_edges, 1) if rows_edges else np.zeros((2, 0), np.int64)),
        edge_shift=floats(_cat(rows_shift, (0, 3), np.float64)),
        task=longs([graphs[i].task for i in twice]),
        charge=floats([graphs[i].charge for i in twice]),
        spin=floats([graphs[i].spin for i in twice]),
    )
    composition = np.zeros((2 * b, num_z))
    for k, i in enumerate(twice):
        counts = np.bincount(graphs[i].atomic_numbers, minlength=num_z)[:num_z]
        composition[k] = counts / max(graphs[i].n_atoms, 1)
    return batch, floats(composition)


def _loss_slots(
    graphs: dict[int, StructureGraph], pieces: list[int], owned: list[np.ndarray], work: RankWork, r: int
) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """The packed group vector, per partitioned structure [energy, virial (9), forces (3n), magmoms (n)]:
    its size, where this rank's contributions go, and the positions of the loss terms this rank holds."""
    sizes = [graphs[i].n_atoms for i in pieces]
    off = np.concatenate([[0], np.cumsum([10 + 4 * n for n in sizes])]).astype(np.int64)

    def slots(ks: list[int], rows: list[np.ndarray]) -> list[np.ndarray]:
        """Packed positions of energies, virials, forces and magmoms of structures ``ks``, atoms ``rows``."""
        return [
            off[ks],
            _flat([off[k] + 1 + np.arange(9) for k in ks]),
            _flat([off[k] + 10 + 3 * a[:, None] + np.arange(3) for k, a in zip(ks, rows, strict=True)]),
            _flat([off[k] + 10 + 3 * sizes[k] + a for k, a in zip(ks, rows, strict=True)]),
        ]

    pack = slots(list(range(len(pieces))), owned[: len(pieces)])
    mine = [k for k, i in enumerate(pieces) if work.loss_owner[i] == r]
    return int(off[-1]), np.concatenate(pack), slots(mine, [np.arange(sizes[k]) for k in mine])


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays]).astype(np.int64) if arrays else np.zeros(0, np.int64)


def predict_sharded(
    model: nn.Module, step: GraphStep, ctx: StepContext, group: Any, loss_batch: Batch
) -> dict[str, torch.Tensor]:
    """Predictions for this rank's loss structures (``loss_batch`` order), differentiable twice.

    Every rank of the group runs the same sequence of operations and collectives whatever its share, so
    the backward passes match collective for collective.
    """
    ctx.n_owned, ctx.halo, ctx.composition = step.n_owned, step.halo, step.composition
    batch, b, k, m = step.batch, step.num_local, step.num_pieces, step.piece_rows
    positions, strain = model_inputs(batch)
    positions = positions[: step.n_owned].detach().requires_grad_()
    ghosts = step.halo.copy(positions).requires_grad_()
    strain = strain[:b].detach().requires_grad_()
    out = model(batch, torch.cat([positions, ghosts]), torch.cat([strain, strain]))
    energy = out["energy"][:b]
    grad_own, grad_ghost, virial = torch.autograd.grad(
        energy.sum(), [positions, ghosts, strain], create_graph=True
    )
    forces = -(grad_own + step.halo.reverse(grad_ghost))
    magmoms = out["magmoms"][: step.n_owned] if "magmoms" in out else forces.new_zeros(step.n_owned)

    contrib = torch.cat([energy[:k], virial[:k].reshape(-1), forces[:m].reshape(-1), magmoms[:m]])
    packed = contrib.new_zeros(step.pack_size).index_add(0, step.pack_index, contrib)
    packed = all_reduce_sum(packed, group)

    virial = torch.cat([virial[k:], packed[step.loss_virial].view(-1, 3, 3)])
    pred = {
        "energy": torch.cat([energy[k:], packed[step.loss_energy]]),
        "forces": torch.cat([forces[m:], packed[step.loss_forces].view(-1, 3)]),
        "stress": stress_from_virial(virial, loss_batch),
        "aux_loss": out["aux_loss"],
        "expert_counts": out["expert_counts"],
        "expert_probs": out["expert_probs"],
    }
    if "magmoms" in out:
        pred["magmoms"] = torch.cat([magmoms[m:], packed[step.loss_magmoms]])
    return pred


def install_hooks(model: nn.Module, ctx: StepContext) -> None:
    """Ghost refresh before each interaction block (its ``atoms``) and before its atom attention (the
    MoE-updated ``source``); the full structures' composition for the composition embedding."""
    model.embed_composition.register_forward_pre_hook(partial(_composition, ctx))
    for block in model.blocks:
        _refresh_before(block, "atoms", ctx)
        _refresh_before(block.atom_attention, "source", ctx)


def _composition(ctx: StepContext, module: nn.Module, args: tuple) -> tuple | None:
    return None if ctx.halo is None else (ctx.composition,)


def _refresh_before(module: nn.Module, name: str, ctx: StepContext) -> None:
    """Refresh the ghost rows of ``module``'s input ``name`` (owned rows first) before each forward; the
    argument is found by name, however the call passes it, so reordering the signature cannot refresh the
    wrong tensor."""
    signature = inspect.signature(module.forward)
    if name not in signature.parameters:
        raise TypeError(f"{type(module).__name__}.forward has no argument {name!r} to refresh ghost rows of")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if ctx.halo is None:
            return None
        bound = signature.bind(*args, **kwargs)
        bound.arguments[name] = ctx.halo.refresh(bound.arguments[name])
        return bound.args, bound.kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)
