"""The fused kernels of `matris.fused` against plain autograd, and what compiling them costs.

    python benchmarks/bench_fused.py [--input FILE] [--repeats 7] [--device cpu|cuda] [--json PATH]

Per kernel, on the shapes of the issue's batch (the first 32 structures of ``crystals_pbe.extxyz.gz``
with at least 12 Å³ per atom): forward, backward with ``create_graph=True`` and the double backward,
the best of ``--repeats``, fused and plain, alternating so that machine drift hits both alike. Kernels
compiled with ``rows_only`` (widths constant) are also timed compiled with every dimension symbolic, and
the attention messages, on a CPU, as the C++ op of `matris.cpu_kernels` that training takes there. Then the
first three training steps of ``matris-6l`` on one 32-atom Cu cell in fresh processes: compiling with an
empty inductor cache, again with that cache warm, and with ``MATRIS_COMPILE=0``. On a GPU (``--device
cuda``) every timing ends with ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_model import DATA, MODELS, labelled_batch, select
from rich.console import Console
from rich.table import Table

from matris import cpu_kernels, fused
from matris.batch import Batch
from matris.config import ModelConfig
from matris.model import triplet_slots

FIRST_STEPS = """
import sys
import time
from dataclasses import replace
import numpy as np
import torch
from ase.build import bulk
from matris import LossConfig, MatRIS, ModelConfig, multitask_loss, predict
from matris.batch import collate
from matris.graph import graph_from_atoms
from matris.properties import parameter_backward
config = ModelConfig.from_preset("matris-6l")
atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
atoms.rattle(0.05, seed=0)
graph = replace(graph_from_atoms(atoms, config.cutoff), energy=-100.0, forces=np.zeros((32, 3)),
                stress=np.zeros((3, 3)))
device = torch.device(sys.argv[1])
batch, model = collate([graph]).to(device), MatRIS(config).to(device)
for _ in range(3):
    start = time.perf_counter()
    loss, _ = multitask_loss(predict(model, batch, training=True), batch, config.tasks, LossConfig())
    parameter_backward(loss, model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(time.perf_counter() - start)
"""


Calls = list[list[torch.Tensor]]  # the inputs of each call of an op


def three_levels(op: Callable, inputs: list[torch.Tensor]) -> None:
    """Forward, backward with ``create_graph=True``, and the backward of the gradients. Every cotangent
    is a dense tensor, as in a training step: the backward of a sum would hand the double backward
    stride-0 cotangents, which it reads far faster than real ones."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = op(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out), create_graph=True)
    torch.autograd.backward(grads, [torch.ones_like(g) for g in grads])


def best_times(cases: dict[str, tuple[Callable, Calls]], repeats: int) -> dict[str, float]:
    """Best time of all its calls per case, a case being an op and the inputs of its calls, the cases
    alternating within each repeat (on a shared machine, so that drift hits every case alike)."""
    _, calls = next(iter(cases.values()))
    sync = torch.cuda.synchronize if calls[0][0].is_cuda else lambda: None
    times = {name: [] for name in cases}
    for repeat in range(repeats + 2):  # two warm-up rounds: compiling, then the allocator
        for name, (op, calls) in cases.items():
            sync()
            start = time.perf_counter()
            for inputs in calls:
                three_levels(op, inputs)
            sync()
            if repeat >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def bucket_shapes(batch: Batch, config: ModelConfig) -> list[tuple[int, int]]:
    """(blocks, size) of every bucket of ``batch``'s dense line graph, as `MatRIS.geometry` builds it."""
    centre, neighbour = batch.edge_index
    shift = torch.bmm(batch.edge_shift.unsqueeze(1), batch.cell[batch.atom_structure[centre]]).squeeze(1)
    length = (batch.positions[neighbour] + shift - batch.positions[centre]).norm(dim=-1)
    return triplet_slots(batch.edge_index, length, config.three_body_cutoff, config.line_buckets)[2]


def kernel_cases(path: Path, device: torch.device) -> dict[str, tuple[dict[str, Callable], Calls]]:
    """Per kernel, shaped as in ``matris-6l`` on the issue's batch: its forms (fused; for the kernels
    compiled with ``rows_only``, also compiled with every dimension symbolic; plain ops) and the inputs
    of their calls."""
    config = MODELS["matris-6l"]
    batch = labelled_batch(select(path, 32), config.cutoff)
    shapes = bucket_shapes(batch, config)
    edges, d, h = batch.num_edges, config.dim, config.num_heads
    width, cap, randn, eps = config.num_angular + 1, config.score_cap, torch.randn, torch.tensor(1e-6)
    line = [
        [randn(g, h, m, m), randn(g, m, h, width), torch.rand(g, 1, m, m), randn(g, m, width, m)]
        for g, m in shapes
    ]
    slots = sum(g * m for g, m in shapes)
    symbolic_swiglu = fused.twice_differentiable(fused._swiglu_forward)
    symbolic_messages = fused.twice_differentiable(fused._sink_messages(cap)[0])
    cases = {
        f"bond MLP activation ({edges:,} × {2 * d})": (
            {
                "fused": lambda h, x, rest: fused.scaled_swiglu(h, x, rest, 1e-6),
                "symbolic": lambda h, x, rest: symbolic_swiglu(h, x, rest, eps),
                "plain": lambda h, x, rest: fused.scaled_swiglu(h, x, rest, 1e-6, fused=False),
            },
            [[torch.randn(edges, 2 * d), torch.randn(edges, d), torch.rand(edges) * 2 * d]],
        ),
        **{
            f"RMSNorm ({rows:,} × {d})": (
                {
                    "fused": lambda x, w: fused.rms_norm(x, w, 1e-6),
                    "plain": lambda x, w: fused.rms_norm(x, w, 1e-6, fused=False),
                },
                [[torch.randn(rows, d), torch.randn(d)]],
            )
            for rows in (edges, slots)
        },
        f"line attention weights ({len(shapes)} buckets, {slots:,} slots)": (
            {
                "fused": lambda *a: fused.line_attention_weights(*a, cap=cap),
                "plain": lambda *a: fused.line_attention_weights(*a, cap=cap, fused=False),
            },
            line,
        ),
        f"attention messages ({edges:,} edges × {h} heads)": (
            {
                "fused": fused._sink_messages(cap)[1],  # compiled; training on a CPU takes the C++ op
                "symbolic": symbolic_messages,
                "plain": lambda *a: fused.sink_messages(*a, cap=cap, fused=False),
                **(
                    {"C++ op": lambda *a: cpu_kernels.sink_messages(*a, cap=cap)}
                    if device.type == "cpu" and cpu_kernels.sink_applies(torch.zeros(1, h, d // h))
                    else {}
                ),
            },
            [[randn(edges, h, d // h), randn(edges, 2 * d), torch.rand(edges)]],
        ),
    }
    return {
        name: (forms, [[x.to(device) for x in inputs] for inputs in calls])
        for name, (forms, calls) in cases.items()
    }


def first_steps(env: dict[str, str], device: torch.device) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", FIRST_STEPS, str(device)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"first training steps failed:\n{done.stderr[-3000:]}")
    return [float(line) for line in done.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DATA / "crystals_pbe.extxyz.gz")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if not fused.available():
        raise SystemExit("MATRIS_COMPILE=0: nothing to compare")
    console = Console(width=140)

    kernels = {}
    for name, (forms, calls) in kernel_cases(args.input, device).items():
        kernels[name] = best_times({form: (op, calls) for form, op in forms.items()}, args.repeats)
    threads = f"{torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    table = Table(title=f"fwd + bwd + double bwd, best of {args.repeats}, {where}")
    columns = (
        "kernel", "fused ms", "all dims symbolic ms", "plain ms", "C++ op ms", "symbolic ÷ fused",
        "plain ÷ fused", "fused ÷ C++ op",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for name, t in kernels.items():
        symbolic, op = t.get("symbolic"), t.get("C++ op")
        table.add_row(
            name,
            f"{t['fused'] * 1e3:.1f}",
            "-" if symbolic is None else f"{symbolic * 1e3:.1f}",
            f"{t['plain'] * 1e3:.1f}",
            "-" if op is None else f"{op * 1e3:.1f}",
            "-" if symbolic is None else f"{symbolic / t['fused']:.2f}",
            f"{t['plain'] / t['fused']:.2f}",
            "-" if op is None else f"{t['fused'] / op:.2f}",
        )
    console.print(table)

    with tempfile.TemporaryDirectory() as cache:
        steps = {
            "compiling, empty cache": first_steps({"TORCHINDUCTOR_CACHE_DIR": cache}, device),
            "compiling, warm cache": first_steps({"TORCHINDUCTOR_CACHE_DIR": cache}, device),
            "plain ops (MATRIS_COMPILE=0)": first_steps({"MATRIS_COMPILE": "0"}, device),
        }
    table = Table(title=f"first training steps of matris-6l, one 32-atom Cu cell, fresh processes, {where}")
    for column in ("run", "step 1 s", "step 2 s", "step 3 s"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, times in steps.items():
        table.add_row(name, *(f"{t:.1f}" for t in times))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"kernels_s": kernels, "first_steps_s": steps}, indent=1))


if __name__ == "__main__":
    main()
