"""Where the training step of ``matris-6l`` spends its time: each layer's share and FLOP efficiency.

    python benchmarks/bench_layers.py [--input FILE] [--repeats 5] [--device cpu|cuda] [--json PATH]
                                      [--line-buckets N ...]

On the issue's batch (the first 32 structures of ``crystals_pbe.extxyz.gz`` with at least 12 Å³ per atom),
every layer of one interaction block runs as in training: forward, the backward to its inputs with
``create_graph=True`` (what forces do) and the backward of those gradients to the parameters. Inputs are
random features of the batch's real sizes plus the geometric tensors through which forces flow (angle
bases, envelopes), so each layer gets exactly the graph shapes of the whole step. Rows are one block's
layer times six (the block count), the geometry (radial and angle bases of the positions), their sum,
and the whole step as in ``bench_model.py`` (embedding, readout, loss and optimizer included). In
isolation a layer differentiates with respect to all its inputs and runs with its own caches, so the sum
comes out above the whole step: read the shares and the efficiencies, not the sum. ``--line-buckets``
adds rows of line attention with the dense line graph cut into other numbers of degree buckets (same
weights, outside the sum), the trade between padding and batched calls; the line-attention rows are then
timed alternating, one call of each per round, so that the machine's drift hits them alike. FLOPs are
`torch.utils.flop_counter` matmul FLOPs, efficiency is FLOPs per second over the 4096² fp32 matmul rate
timed in the same process, as in ``bench_model.py`` (8192² with TF32 off on a GPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import ase.io
import torch
from _step_timing import time_steps
from bench_fused import best_times, three_levels
from bench_model import DATA, MODELS, labelled_batch, matmul_flops_per_s, measure, select
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from matris import MatRIS
from matris.layers import TripletBlocks
from matris.properties import inputs

Case = tuple[Callable[..., torch.Tensor], list[torch.Tensor]]


def layer_cases(model: MatRIS, frames: list) -> dict[str, Case]:
    """Op and inputs of each layer of block 0 and of the geometry, on the batch of ``frames``."""
    config, device = model.config, next(model.parameters()).device
    batch = labelled_batch(frames, config.cutoff).to(device)
    positions, strain = inputs(batch)
    with torch.no_grad():
        g, _ = model.geometry(batch, positions, strain)
    block, t = model.blocks[0], g.triplets
    atoms = torch.randn(batch.num_atoms, config.dim, device=device)
    bonds = torch.randn(batch.num_edges, config.dim, device=device)
    buckets = len(t.shapes)

    def line_attention(bonds: torch.Tensor, *geometry: torch.Tensor) -> torch.Tensor:
        blocks = TripletBlocks(t.bonds, t.shapes, list(geometry[buckets:]), list(geometry[:buckets]))
        update = block.line_attention.dense(block.line_norm(bonds.index_select(0, t.bonds)), blocks)
        return bonds.index_add(0, t.bonds, update)

    def geometry(positions: torch.Tensor) -> torch.Tensor:
        g, radial = model.geometry(batch, positions, strain)
        parts = [radial, g.envelope, *g.triplets.angle, *g.triplets.envelope]
        return torch.cat([x.flatten() for x in parts])

    return {
        "bond refinement": (
            lambda a, b: block.refine_bonds(a, b, g, block.residual_scale[0]),
            [atoms, bonds],
        ),
        f"line attention ({len(t.shapes)} buckets, {sum(m * m * n for n, m in t.shapes):,} block pairs)": (
            line_attention,
            [bonds, *t.angle, *t.envelope],
        ),
        "atom attention": (
            lambda a, b, envelope: block.atom_attention(
                block.message_norm(a), a, block.bond_norm(b), g.centre, g.neighbour, envelope
            ),
            [atoms, bonds, g.envelope],
        ),
        "feed-forward (message, update)": (
            lambda a: block.message(block.message_norm(a)) + block.update(block.update_norm(a)),
            [atoms],
        ),
        "geometry (radial and angle bases)": (geometry, [positions.detach()]),
    }


def count_flops(op: Callable[..., torch.Tensor], tensors: list[torch.Tensor]) -> int:
    """Matmul FLOPs of ``three_levels``; modules get copies of the inputs, since FlopCounterMode's backward
    hooks on a module fail when ``autograd.grad`` differentiates with respect to that module's leaf input."""
    with FlopCounterMode(display=False) as counter:
        three_levels(lambda *xs: op(*(x.clone() for x in xs)), tensors)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DATA / "crystals_pbe.extxyz.gz")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--line-buckets", type=int, nargs="+", default=[], metavar="N")
    args = parser.parse_args()
    device = torch.device(args.device)
    frames = select(args.input, 32)
    config = MODELS["matris-6l"]
    torch.manual_seed(0)
    model = MatRIS(config).to(device)

    cases = layer_cases(model, frames)
    summed = list(cases)
    line = {k: v for k, v in cases.items() if k.startswith("line attention")}
    for count in args.line_buckets:
        other = MatRIS(config.model_copy(update={"line_buckets": count})).to(device)
        other.load_state_dict(model.state_dict())
        line.update((k, v) for k, v in layer_cases(other, frames).items() if k.startswith("line attention"))
    cases.update(line)
    alternating = {}
    if args.line_buckets:
        alternating = best_times({k: (op, [x]) for k, (op, x) in line.items()}, args.repeats)
    rows = {}
    for name, (op, tensors) in cases.items():
        if name in alternating:
            step_s = alternating[name]
        else:
            step_s = time_steps(lambda op=op, x=tensors: three_levels(op, x), args.repeats, device)["step_s"]
        times = 1 if name.startswith("geometry") else config.num_blocks
        rows[name] = {"s": times * step_s, "flops": times * count_flops(op, tensors)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.extxyz"
        ase.io.write(path, frames, format="extxyz")
        step = measure("matris-6l", path, args.repeats, device)
    matmul, _ = matmul_flops_per_s(device)
    layers = {"s": sum(rows[k]["s"] for k in summed), "flops": sum(rows[k]["flops"] for k in summed)}
    rows["sum of the rows above"] = layers
    rows["whole step"] = {"s": step["step_s"], "flops": step["flops"]["total"]}

    table = Table(
        title=f"matris-6l training step by layer, {step['atoms']} atoms, {step['edges']:,} edges, "
        f"{step['device']}, {torch.get_num_threads()} threads; layers ×{config.num_blocks} blocks, "
        f"best of {args.repeats}; "
        f"matmul {matmul / 1e9:.0f} GFLOP/s"
    )
    for column in ("layer", "s", "share of layers' time", "GFLOP", "FLOP eff."):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for name, r in rows.items():
        r["share"] = r["s"] / layers["s"]
        r["flop_efficiency"] = r["flops"] / r["s"] / matmul
        table.add_row(
            name,
            f"{r['s']:.2f}",
            f"{100 * r['share']:.0f}%",
            f"{r['flops'] / 1e9:.1f}",
            f"{100 * r['flop_efficiency']:.0f}%",
        )
    Console(width=160).print(table)
    threads = torch.get_num_threads()
    report = {"device": step["device"], "matmul_flops_per_s": matmul, "threads": threads, "rows": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
