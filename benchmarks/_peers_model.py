"""One peer model's training step on the frames of an extxyz file; prints one JSON line.

Run by ``bench_model.py`` with the peers' interpreter (``/work/peers-venv/bin/python``), one model per
process so that ``ru_maxrss`` is that model's peak. Peers, random weights, float32:

- ``matris-pub``: the published MatRIS (PyPI ``matris`` 0.1.0), ``MatRIS(num_layers=6)``, its own graph
  converter (6 Å atom graph, 4 Å line graph), ``task="efs"`` with ``is_training=True``;
- ``mace``: ``mace.modules.MACE`` with hidden irreps 128x0e, max_ell 3, 2 interactions, r_max 6 Å,
  correlation 3, 8 Bessel functions, the residual interaction blocks of ``mace_run_train``;
- ``chgnet``: ``chgnet.model.CHGNet()`` (its default architecture: 6 Å atom graph, 3 Å bond graph).

A step is forward, forces and stress with ``create_graph=True``, a mean-squared loss on energy per atom,
forces and stress, backward and an AdamW step; graphs are built once, outside the timed steps.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import ase.io
import numpy as np
import torch
from _step_timing import profile_step, time_steps
from ase import Atoms

Step = Callable[[], torch.Tensor]


def labels(frames: list[Atoms], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Energy per atom (b,), forces (n, 3) and stress (b, 3, 3) of the frames, float32."""
    energy = torch.tensor([a.info["REF_energy"] / len(a) for a in frames])
    forces = torch.from_numpy(np.concatenate([a.arrays["REF_forces"] for a in frames]))
    stress = torch.from_numpy(np.stack([np.reshape(a.info["REF_stress"], (3, 3)) for a in frames]))
    return tuple(t.to(device, torch.float32) for t in (energy, forces, stress))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square().mean()


def matris_pub(frames: list[Atoms], device: torch.device) -> tuple[torch.nn.Module, Step]:
    from pymatgen.io.ase import AseAtomsAdaptor

    from matris.model import MatRIS

    model = MatRIS(num_layers=6)
    graphs = [model.graph_converter(AseAtomsAdaptor.get_structure(a)).to(device) for a in frames]
    energy, forces, stress = labels(frames, device)

    def loss() -> torch.Tensor:
        out = model(graphs, task="efs", is_training=True)
        return (
            mse(out["e"], energy)
            + mse(torch.cat(out["f"]), forces)
            + 0.1 * mse(torch.stack(out["s"]), stress * 160.21766208)  # published stress is in GPa
        )

    return model, loss


def mace(frames: list[Atoms], device: torch.device) -> tuple[torch.nn.Module, Step]:
    torch.serialization.add_safe_globals(
        [slice]
    )  # e3nn 0.4.4 torch.loads its constants.pt, which holds slices
    from e3nn import o3
    from mace.data import AtomicData, config_from_atoms
    from mace.data.utils import KeySpecification
    from mace.modules import MACE, RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric import Batch

    zs = sorted({int(z) for a in frames for z in a.numbers})
    table = AtomicNumberTable(zs)
    keys = KeySpecification(
        info_keys={"energy": "REF_energy", "stress": "REF_stress"}, arrays_keys={"forces": "REF_forces"}
    )
    data = [
        AtomicData.from_config(config_from_atoms(a, key_specification=keys), z_table=table, cutoff=6.0)
        for a in frames
    ]
    batch = Batch.from_data_list(data).to(device).to_dict()
    avg_neighbours = batch["edge_index"].shape[1] / batch["positions"].shape[0]
    model = MACE(
        r_max=6.0,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=3,
        interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=2,
        num_elements=len(zs),
        hidden_irreps=o3.Irreps("128x0e"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(zs)),
        avg_num_neighbors=avg_neighbours,
        atomic_numbers=zs,
        correlation=3,
        gate=torch.nn.functional.silu,
        radial_MLP=[64, 64, 64],
    )
    energy, forces, stress = labels(frames, device)
    atoms_per_structure = torch.tensor([len(a) for a in frames], dtype=torch.float32, device=device)

    def loss() -> torch.Tensor:
        out = model(dict(batch), training=True, compute_force=True, compute_stress=True)
        return (
            mse(out["energy"] / atoms_per_structure, energy)
            + mse(out["forces"], forces)
            + mse(out["stress"], stress)
        )

    return model, loss


def chgnet(frames: list[Atoms], device: torch.device) -> tuple[torch.nn.Module, Step]:
    from chgnet.model import CHGNet
    from pymatgen.io.ase import AseAtomsAdaptor

    model = CHGNet()
    graphs = [model.graph_converter(AseAtomsAdaptor.get_structure(a)).to(device) for a in frames]
    energy, forces, stress = labels(frames, device)

    def loss() -> torch.Tensor:
        out = model(graphs, task="efs")
        return (
            mse(out["e"], energy)
            + mse(torch.cat(out["f"]), forces)
            + 0.1 * mse(torch.stack(out["s"]), stress * 160.21766208)  # CHGNet's stress is in GPa
        )

    return model, loss


PEERS = {"matris-pub": matris_pub, "mace": mace, "chgnet": chgnet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=PEERS, required=True)
    parser.add_argument("--input", required=True, help="extxyz file; every frame is used")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    frames = ase.io.read(args.input, ":", format="extxyz")
    model, loss = PEERS[args.model](frames, device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    timing = time_steps(step, args.steps, device)
    profile = profile_step(step, device, timing["step_s"])
    n_atoms = sum(len(a) for a in frames)
    print(
        json.dumps(
            {
                "model": args.model,
                "structures": len(frames),
                "atoms": n_atoms,
                "params": sum(p.numel() for p in model.parameters()),
                **timing,
                **profile,
                "atoms_per_s": n_atoms / timing["step_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
