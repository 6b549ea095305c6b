"""MatRIS-MoE: invariant attention over the atom graph (6 Å) and its line graph (4 Å), element-routed MoE.

The model maps (batch, positions, strain) to per-structure energies. Forces and stress are taken by autograd
outside the module (``matris.properties``), so a distributed trainer can run its hooks between the forward
and the force backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from matris.batch import Batch
from matris.config import ModelConfig
from matris.layers import AtomAttention, GatedMLP, LineAttention, RadialBasis, legendre, polynomial_envelope
from matris.moe import MoE


@torch.no_grad()
def line_graph(
    edge_index: torch.Tensor, edge_length: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triplets as (a, b): all ordered pairs a ≠ b of bonds shorter than ``cutoff`` with the same centre atom.

    Short bonds are sorted by centre; bond a pairs with every bond of its centre's contiguous run.
    """
    short = torch.nonzero(edge_length < cutoff).squeeze(-1)
    centre = edge_index[0, short]
    order = torch.argsort(centre, stable=True)
    short, centre = short[order], centre[order]
    _, degree = torch.unique_consecutive(centre, return_counts=True)
    run_start = (degree.cumsum(0) - degree).repeat_interleave(degree)
    run_length = degree.repeat_interleave(degree)
    a = torch.arange(short.shape[0], device=short.device).repeat_interleave(run_length)
    b = run_start[a] + torch.arange(a.shape[0], device=a.device) - (run_length.cumsum(0) - run_length)[a]
    keep = a != b
    return short[a[keep]], short[b[keep]]


@dataclass
class Geometry:
    """Graph indices and smooth geometric features shared by all interaction blocks."""

    z: torch.Tensor  # (n,) atomic numbers
    centre: torch.Tensor  # (e,)
    neighbour: torch.Tensor  # (e,)
    envelope: torch.Tensor  # (e,) 6 Å switch
    triplet_target: torch.Tensor  # (t,) bond receiving the message
    triplet_source: torch.Tensor  # (t,) bond sending it
    angle: torch.Tensor  # (t, num_angular) angle basis, switched off with both bonds at 4 Å
    triplet_envelope: torch.Tensor  # (t,)


class InteractionBlock(nn.Module):
    """Bond refinement → line-graph attention → MoE message construction → atom attention → MoE update."""

    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        d, heads, cap = config.dim, config.num_heads, config.score_cap
        self.refine_norm = nn.RMSNorm(3 * d)
        self.refine = GatedMLP(3 * d, d, d)
        self.line_norm = nn.RMSNorm(d)
        self.line_attention = LineAttention(d, config.num_angular, heads, cap)
        self.message_norm = nn.RMSNorm(d)
        self.bond_norm = nn.RMSNorm(d)
        self.message = self._feed_forward(config, moe)
        self.atom_attention = AtomAttention(d, heads, cap)
        self.update_norm = nn.RMSNorm(d)
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
        pair = torch.cat([atoms[g.centre], atoms[g.neighbour], bonds], dim=-1)
        bonds = bonds + scale[0] * self.refine(self.refine_norm(pair))
        bonds = bonds + scale[1] * self.line_attention(
            self.line_norm(bonds), g.angle, g.triplet_target, g.triplet_source, g.triplet_envelope
        )
        query = self.message_norm(atoms)
        source = query + _apply(self.message, query, g.z, routing)
        atoms = atoms + scale[2] * self.atom_attention(
            query, source, self.bond_norm(bonds), g.centre, g.neighbour, g.envelope
        )
        atoms = atoms + scale[3] * _apply(self.update, self.update_norm(atoms), g.z, routing)
        routing = torch.stack(routing) if routing else atoms.new_zeros(0, 2, self.num_experts)
        return atoms, bonds, routing


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
        self.norm = nn.RMSNorm(d)
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
        vector = pos[neighbour] + shift - pos[centre]
        length = vector.norm(dim=-1)
        target, source = line_graph(batch.edge_index, length, self.config.three_body_cutoff)
        cosine = (vector[target] * vector[source]).sum(-1) / (length[target] * length[source])
        switch = polynomial_envelope(length, self.config.three_body_cutoff)
        triplet_envelope = switch[target] * switch[source]
        return Geometry(
            z=batch.atomic_numbers,
            centre=centre,
            neighbour=neighbour,
            envelope=polynomial_envelope(length, self.config.cutoff),
            triplet_target=target,
            triplet_source=source,
            angle=legendre(cosine, self.config.num_angular) * triplet_envelope.unsqueeze(-1),
            triplet_envelope=triplet_envelope,
        ), self.radial(length)

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
        atoms, bonds = self.embed(batch), self.embed_bond(radial)
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
