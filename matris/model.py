"""MatRIS-MoE: invariant attention over the atom graph (6 Å) and its line graph (4 Å), element-routed MoE.

The model maps (batch, positions, strain) to per-structure energies. Forces and stress are taken by autograd
outside the module (``matris.properties``), so a distributed trainer can run its hooks between the forward
and the force backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from matris.batch import Batch
from matris.config import ModelConfig
from matris.fused import scaled_swiglu
from matris.layers import (
    AtomAttention,
    GatedMLP,
    LineAttention,
    RadialBasis,
    RMSNorm,
    TripletBlocks,
    legendre,
    polynomial_envelope,
)
from matris.moe import MoE


def _short_bonds(
    edge_index: torch.Tensor, edge_length: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, ...]:
    """Bonds shorter than ``cutoff`` sorted by centre atom, and each centre's run in that order: the
    start and length (degree) of every run."""
    short = torch.nonzero(edge_length < cutoff).squeeze(-1)
    centre = edge_index[0, short]
    order = torch.argsort(centre, stable=True)
    short, centre = short[order], centre[order]
    _, degree = torch.unique_consecutive(centre, return_counts=True)
    return short, degree.cumsum(0) - degree, degree


@torch.no_grad()
def line_graph(
    edge_index: torch.Tensor, edge_length: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplets as (a, b): all ordered pairs a ≠ b of bonds shorter than ``cutoff`` with the same centre atom.

    Short bonds are sorted by centre; bond a pairs with every bond of its centre's contiguous run.
    """
    short, start, degree = _short_bonds(edge_index, edge_length, cutoff)
    run_start = start.repeat_interleave(degree)
    run_length = degree.repeat_interleave(degree)
    a = torch.arange(short.shape[0], device=short.device).repeat_interleave(run_length)
    b = run_start[a] + torch.arange(a.shape[0], device=a.device) - (run_length.cumsum(0) - run_length)[a]
    keep = a != b
    return short[a[keep]], short[b[keep]]


def _bucket_sizes(degrees: list[int], counts: list[int], max_buckets: int) -> list[int]:
    """Padded sizes of at most ``max_buckets`` buckets of consecutive distinct ``degrees`` (ascending, with
    ``counts`` centres each) minimising the padded block area Σ centres · size² (dynamic programming)."""
    prefix = [0]
    for count in counts:
        prefix.append(prefix[-1] + count)
    n = len(degrees)
    # best[j] = (area, sizes) of the first j degrees split into the buckets tried so far
    best = [(0, [])] + [(prefix[j] * degrees[j - 1] ** 2, [degrees[j - 1]]) for j in range(1, n + 1)]
    for _ in range(max_buckets - 1):
        best = [best[0]] + [
            min(
                (best[i][0] + (prefix[j] - prefix[i]) * degrees[j - 1] ** 2, [*best[i][1], degrees[j - 1]])
                for i in range(j)
            )
            for j in range(1, n + 1)
        ]
    return best[n][1]


@torch.no_grad()
def triplet_slots(
    edge_index: torch.Tensor, edge_length: torch.Tensor, cutoff: float, max_buckets: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Slots of the dense line graph (`TripletBlocks`): the edge of every slot (padding repeats the
    centre's first short bond), whether it is a real bond, and the (centres, size) of every bucket."""
    short, start, degree = _short_bonds(edge_index, edge_length, cutoff)
    start, degree = start[degree > 1], degree[degree > 1]  # a lone short bond has no triplet
    values, counts = torch.unique(degree, return_counts=True)
    slots, real, shapes, lower = [], [], [], 1
    for size in _bucket_sizes(values.tolist(), counts.tolist(), max_buckets):
        pick = (degree > lower) & (degree <= size)
        offset = torch.arange(size, device=short.device)
        valid = offset < degree[pick].unsqueeze(-1)
        slots.append(short[start[pick].unsqueeze(-1) + offset * valid].flatten())
        real.append(valid.flatten())
        shapes.append((int(pick.sum()), size))
        lower = size
    if not shapes:
        return short[:0], short[:0].bool(), []
    return torch.cat(slots), torch.cat(real), shapes


@dataclass
class Geometry:
    """Graph indices and smooth geometric features shared by all interaction blocks.

    The line graph comes either as ``triplets`` (dense blocks, what `MatRIS.geometry` builds) or as a
    triplet list (the four ``triplet_*``/``angle`` fields, for callers that build it themselves).
    """

    z: torch.Tensor  # (n,) atomic numbers
    centre: torch.Tensor  # (e,)
    neighbour: torch.Tensor  # (e,)
    envelope: torch.Tensor  # (e,) 6 Å switch
    triplets: TripletBlocks | None = None
    triplet_target: torch.Tensor | None = None  # (t,) bond receiving the message
    triplet_source: torch.Tensor | None = None  # (t,) bond sending it
    angle: torch.Tensor | None = None  # (t, num_angular) angle basis, switched off with both bonds at 4 Å
    triplet_envelope: torch.Tensor | None = None  # (t,)


class InteractionBlock(nn.Module):
    """Bond refinement → line-graph attention → MoE message construction → atom attention → MoE update."""

    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        d, heads, cap = config.dim, config.num_heads, config.score_cap
        self.refine_norm = RMSNorm(3 * d)
        self.refine = GatedMLP(3 * d, d, d)
        self.line_norm = RMSNorm(d)
        self.line_attention = LineAttention(d, config.num_angular, heads, cap)
        self.message_norm = RMSNorm(d)
        self.bond_norm = RMSNorm(d)
        self.message = self._feed_forward(config, moe)
        self.atom_attention = AtomAttention(d, heads, cap)
        self.update_norm = RMSNorm(d)
        self.update = self._feed_forward(config, moe)
        self.residual_scale = nn.Parameter(torch.ones(4))
        self.num_experts = config.num_experts

    @staticmethod
    def _feed_forward(config: ModelConfig, moe: bool) -> nn.Module:
        if not moe:
            return GatedMLP(config.dim, config.mlp_hidden)
        return MoE(
            config.dim,
            config.expert_hidden,
            config.num_experts,
            config.top_k,
            config.num_shared_experts,
            config.max_z,
        )

    def forward(
        self, atoms: torch.Tensor, bonds: torch.Tensor, g: Geometry
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New atom and bond features, and routing statistics (MoE layers, 2, E): tokens per expert and
        summed router probabilities. They are outputs, not side effects, so that a sharding wrapper sees
        the gradient of the balance loss arrive through its backward hooks."""
        scale, routing = self.residual_scale, []
        bonds = self.refine_bonds(atoms, bonds, g, scale[0])
        if g.triplets is None:
            bonds = bonds + scale[1] * self.line_attention(
                self.line_norm(bonds), g.angle, g.triplet_target, g.triplet_source, g.triplet_envelope
            )
        else:
            slots = g.triplets.bonds
            x = self.line_norm(bonds.index_select(0, slots))
            bonds = bonds.index_add(0, slots, self.line_attention.dense(x, g.triplets, scale[1]))
        query = self.message_norm(atoms)
        source = query + _apply(self.message, query, g.z, routing)
        atoms = atoms + scale[2] * self.atom_attention(
            query, source, self.bond_norm(bonds), g.centre, g.neighbour, g.envelope
        )
        atoms = atoms + scale[3] * _apply(self.update, self.update_norm(atoms), g.z, routing)
        routing = torch.stack(routing) if routing else atoms.new_zeros(0, 2, self.num_experts)
        return atoms, bonds, routing

    def refine_bonds(self, atoms: torch.Tensor, bonds: torch.Tensor, g: Geometry, scale: torch.Tensor):
        """``bonds + scale · refine(refine_norm([atoms_i, atoms_j, bond_ij]))`` without building the
        (e, 3d) pairs: the RMSNorm only rescales each edge's row, so the atom thirds of the first layer run
        per atom, and the bond third and the residual sum go into the matmuls (``addmm``)."""
        d, norm, mlp = atoms.shape[1], self.refine_norm, self.refine
        eps = norm.epsilon(atoms.dtype)
        weight = torch.cat([mlp.w1.weight, mlp.w3.weight]) * norm.weight  # (2 hidden, 3d)
        centre_w, neighbour_w, bond_w = (w.contiguous() for w in weight.split(d, dim=1))  # see AtomAttention
        centre_part = F.linear(atoms, centre_w).index_select(0, g.centre)
        neighbour_part = F.linear(atoms, neighbour_w).index_select(0, g.neighbour)
        hidden = torch.addmm(centre_part + neighbour_part, bonds, bond_w.T)
        square = atoms.square().sum(-1)
        square = square.index_select(0, g.centre) + square.index_select(0, g.neighbour)
        activation = scaled_swiglu(hidden, bonds, square, eps, fused=self.training)
        return torch.addmm(bonds, activation, (scale * mlp.w2.weight).T)


def _apply(layer: nn.Module, x: torch.Tensor, z: torch.Tensor, routing: list) -> torch.Tensor:
    """Run a dense or MoE feed-forward layer, collecting the MoE routing statistics."""
    if isinstance(layer, MoE):
        y, counts, probs = layer(x, z)
        routing.append(torch.stack([counts, probs]))
        return y
    return layer(x)


class MatRIS(nn.Module):
    """Energy model; ``blocks`` is the ModuleList a distributed trainer wraps block by block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d, num_z = config.dim, config.max_z + 1
        self.embed_element = nn.Embedding(num_z, d)
        self.embed_task = nn.Embedding(len(config.tasks), d)
        self.embed_composition = nn.Linear(num_z, d, bias=False)
        self.embed_charge_spin = nn.Sequential(nn.Linear(2, d), nn.SiLU(), nn.Linear(d, d))
        self.radial = RadialBasis(config.num_radial, config.cutoff)
        self.embed_bond = nn.Linear(config.num_radial, d)
        moe = set(config.moe_blocks)
        self.blocks = nn.ModuleList(InteractionBlock(config, i in moe) for i in range(config.num_blocks))
        self.norm = RMSNorm(d)
        self.energy_head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
        self.magmom_head = (
            nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1)) if config.magmom_head else None
        )
        self.register_buffer("reference_energy", torch.zeros(len(config.tasks), num_z))

    def set_reference_energies(self, energies: dict[str, dict[int, float]]) -> None:
        """Per-task, per-element reference energies (eV) added to every atom's energy."""
        for task, table in energies.items():
            if task not in self.config.tasks:
                raise KeyError(f"unknown task {task!r}; known tasks: {', '.join(self.config.tasks)}")
            row = self.config.tasks.index(task)
            for z, energy in table.items():
                self.reference_energy[row, int(z)] = float(energy)

    def trained_elements(self, task: str) -> set[int]:
        """Atomic numbers of ``task``'s training split: those with a reference energy (fitted on it)."""
        row = self.reference_energy[self.config.tasks.index(task)]
        return set(torch.nonzero(row).flatten().tolist())

    def geometry(
        self, batch: Batch, positions: torch.Tensor, strain: torch.Tensor
    ) -> tuple[Geometry, torch.Tensor]:
        """Graph features of the strained structures (r → r (1 + ε)) and the radial basis of the bonds."""
        s = batch.atom_structure
        deform = torch.eye(3, dtype=strain.dtype, device=strain.device) + strain
        pos = torch.bmm(positions.unsqueeze(1), deform[s]).squeeze(1)
        cell = torch.bmm(batch.cell, deform)
        centre, neighbour = batch.edge_index
        shift = torch.bmm(batch.edge_shift.unsqueeze(1), cell[s[centre]]).squeeze(1)
        vector = pos.index_select(0, neighbour) + shift - pos.index_select(0, centre)
        length = vector.norm(dim=-1)
        return Geometry(
            z=batch.atomic_numbers,
            centre=centre,
            neighbour=neighbour,
            envelope=polynomial_envelope(length, self.config.cutoff),
            triplets=self.triplet_blocks(batch.edge_index, vector, length),
        ), self.radial(length)

    def triplet_blocks(
        self, edge_index: torch.Tensor, vector: torch.Tensor, length: torch.Tensor
    ) -> TripletBlocks:
        """The dense line graph of the bonds shorter than the three-body cutoff, angles and switches."""
        cutoff = self.config.three_body_cutoff
        slots, real, shapes = triplet_slots(edge_index, length, cutoff, self.config.line_buckets)
        sizes = [g * m for g, m in shapes]
        unit = (vector / length.unsqueeze(-1)).index_select(0, slots).split(sizes)
        switch = (polynomial_envelope(length, cutoff).index_select(0, slots) * real).split(sizes)
        envelope, angle = [], []
        for (g, m), u, s in zip(shapes, unit, switch, strict=True):
            u, s = u.view(g, m, 3), s.view(g, m)
            pair = s.unsqueeze(-1) * s.unsqueeze(-2) * (1 - torch.eye(m, dtype=s.dtype, device=s.device))
            basis = legendre(u @ u.transpose(1, 2), self.config.num_angular, dim=2) * pair.unsqueeze(2)
            envelope.append(pair.unsqueeze(1))
            angle.append(torch.cat([basis, torch.ones_like(basis[:, :, :1])], dim=2))
        return TripletBlocks(slots, shapes, envelope, angle)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Initial atom features: element + task + composition + charge/spin of its structure."""
        s, z = batch.atom_structure, batch.atomic_numbers
        dtype = self.embed_composition.weight.dtype
        composition = torch.zeros(batch.num_structures, self.config.max_z + 1, dtype=dtype, device=z.device)
        composition = composition.index_put((s, z), torch.ones_like(z, dtype=dtype), accumulate=True)
        composition = composition / batch.n_atoms.unsqueeze(-1).to(dtype)
        charge_spin = torch.stack([batch.charge, batch.spin - 1], dim=-1).to(dtype)
        structure = (
            self.embed_task(batch.task)
            + self.embed_composition(composition)
            + self.embed_charge_spin(charge_spin)
        )
        return self.embed_element(z) + structure[s]

    def forward(self, batch: Batch, positions: torch.Tensor, strain: torch.Tensor) -> dict[str, torch.Tensor]:
        """``energy`` (b,), ``aux_loss`` (scalar), ``expert_counts``/``expert_probs`` (MoE layers, E) and
        ``magmoms`` (n,) if the head is on; ``strain`` is a symmetric displacement gradient (b, 3, 3)."""
        geometry, radial = self.geometry(batch, positions, strain)
        # embed_bond(radial) with a contiguous (num_radial, d) right operand: its weight gradient is then
        # radialᵀ @ grad, (7, e) @ (e, d), which BLAS runs ~7x faster than gradᵀ @ radial, (d, e) @ (e, 7)
        weight = self.embed_bond.weight.T.contiguous()
        atoms, bonds = self.embed(batch), torch.addmm(self.embed_bond.bias, radial, weight)
        routing = []
        for block in self.blocks:
            atoms, bonds, block_routing = block(atoms, bonds, geometry)
            routing.append(block_routing)
        atoms = self.norm(atoms)
        s, z = batch.atom_structure, batch.atomic_numbers
        atom_energy = self.energy_head(atoms).squeeze(-1) + self.reference_energy[batch.task[s], z]
        energy = atom_energy.new_zeros(batch.num_structures).index_add(0, s, atom_energy)
        routing = torch.cat(routing)
        counts, probs = (x.clone() for x in routing.unbind(1))  # copies: module outputs must not be views
        out = {
            "energy": energy,
            "aux_loss": load_balance_loss(counts, probs, batch.num_atoms),
            "expert_counts": counts.detach(),
            "expert_probs": probs,
        }
        if self.magmom_head is not None:
            out["magmoms"] = self.magmom_head(atoms).squeeze(-1).clone()
        return out


def load_balance_loss(counts: torch.Tensor, probs: torch.Tensor, num_tokens) -> torch.Tensor:
    """Switch-Transformer balance loss E Σ_e f_e P_e, averaged over MoE layers (1 when balanced).

    ``counts`` (layers, E) are tokens sent to each expert (f_e = its share of all K·n dispatches),
    ``probs`` the router probabilities summed over tokens; both may be sums over ranks, with
    ``num_tokens`` the matching token count.
    """
    if counts.shape[0] == 0:
        return probs.sum()
    fraction = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return (counts.shape[1] * fraction * probs / max(num_tokens, 1)).sum(-1).mean()
