"""Energy, forces and stress: the model gives energies, autograd gives their derivatives.

Forces are -dE/dr; stress is (1/V) dE/dε for a symmetric strain ε applied as r → r (1 + ε), which is ASE's
sign convention (positive means the cell pulls inwards, i.e. tensile). ``predict`` is forward plus
``derivatives``; a distributed trainer that must act between the two calls them separately.
``parameter_backward`` is a training loss's backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from matris.batch import Batch


def inputs(batch: Batch, forces: bool = True, stress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and a zero strain (b, 3, 3), each requiring grad if its derivative is wanted."""
    positions = batch.positions.detach().requires_grad_(forces)
    strain = batch.positions.new_zeros(batch.num_structures, 3, 3).requires_grad_(stress)
    return positions, strain


def derivatives(
    energy: torch.Tensor, positions: torch.Tensor, strain: torch.Tensor, batch: Batch, create_graph: bool
) -> dict[str, torch.Tensor]:
    """``forces`` (n, 3) and ``stress`` (b, 3, 3) for the inputs that require grad; stress is zero for
    structures without a periodic 3D cell."""
    wanted = [x for x in (positions, strain) if x.requires_grad]
    if not wanted:
        return {}
    grads = list(torch.autograd.grad(energy.sum(), wanted, create_graph=create_graph))
    out = {}
    if positions.requires_grad:
        out["forces"] = -grads.pop(0)
    if strain.requires_grad:
        out["stress"] = stress_from_virial(grads.pop(0), batch)
    return out


def stress_from_virial(virial: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(1/V) sym(dE/dε) for periodic cells with volume, zero otherwise."""
    volume = torch.linalg.det(batch.cell).abs()
    periodic = batch.pbc.all(dim=-1) & (volume > 1e-8)
    scale = torch.where(periodic, 1 / volume.clamp(min=1e-8), torch.zeros_like(volume))
    return 0.5 * (virial + virial.transpose(1, 2)) * scale[:, None, None]


def predict(
    model: nn.Module, batch: Batch, forces: bool = True, stress: bool = True, training: bool = False
) -> dict[str, torch.Tensor]:
    """Model outputs plus ``forces`` (n, 3) and ``stress`` (b, 3, 3) (zeros for cells without volume).

    With ``training=True`` the derivatives keep their graph, so a loss on forces can be backpropagated.
    """
    positions, strain = inputs(batch, forces, stress)
    with torch.set_grad_enabled(training or forces or stress):
        out = dict(model(batch, positions, strain))
        out.update(derivatives(out["energy"], positions, strain, batch, create_graph=training))
    if not training:
        out = {k: v.detach() for k, v in out.items()}
    return out


def parameter_backward(loss: torch.Tensor, model: nn.Module, leaves: Iterable[torch.Tensor] = ()) -> None:
    """``loss.backward()`` into the model's parameters (and any other ``leaves`` whose gradients are read).

    A loss on forces or stress has positions and strain as leaves of its graph; a plain backward also runs
    the geometry's double backward (angle basis, envelopes, radial basis) for their gradients, which no one
    reads (a small share of the step: ``benchmarks/bench_step.py``). The parameters are read here, after
    the forward, because FSDP2 swaps the unsharded ones that the graph holds into the modules for the step.
    """
    wanted = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.backward(loss, inputs=[*wanted, *leaves])
