"""The training step of ``matris-6l`` by phase, and its loss backward stopped at the parameters or not.

    python benchmarks/bench_step.py [--input FILE] [--rounds 8] [--device cpu|cuda] [--json PATH]

On the issue's batch (the first 32 structures of ``crystals_pbe.extxyz.gz`` with at least 12 Å³ per
atom), whole training steps as in ``bench_model.py``, timed phase by phase: forward, force and stress
backward with ``create_graph=True``, loss, its backward, AdamW. The steps alternate, round by round in one
process, between the trainer's backward (`matris.properties.parameter_backward`, which stops at the
parameters) and a plain ``loss.backward()`` (which also differentiates into positions and strain), so that
the machine's drift hits both alike. Reported per phase: best time over the rounds, matmul GFLOP
(`matris.flops.model_flops`), GFLOP/s and their share of a 4096² fp32 matmul's rate timed after the rounds
(8192², TF32 off, on a GPU); and the ratio of the two backwards, best and median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_model import DATA, MODELS, labelled_batch, matmul_flops_per_s, select
from rich.console import Console
from rich.table import Table

from matris import LossConfig, MatRIS, multitask_loss
from matris.flops import model_flops
from matris.properties import derivatives, inputs, parameter_backward

PHASES = ("forward", "force_backward", "loss_backward", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DATA / "crystals_pbe.extxyz.gz")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = MODELS["matris-6l"]
    batch = labelled_batch(select(args.input, 32), config.cutoff).to(device)
    torch.manual_seed(0)
    model = MatRIS(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    flops = model_flops(model, batch)
    flops = {"forward": flops["forward"], "force_backward": flops["force_backward"],
             "loss_backward": flops["param_backward"], "step": flops["total"]}

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step(backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        t0 = clock()
        positions, strain = inputs(batch)
        out = model(batch, positions, strain)
        t1 = clock()
        pred = {**out, **derivatives(out["energy"], positions, strain, batch, create_graph=True)}
        t2 = clock()
        loss, _ = multitask_loss(pred, batch, config.tasks, LossConfig())
        backward(loss)
        t3 = clock()
        optimizer.step()
        t4 = clock()
        return {"forward": t1 - t0, "force_backward": t2 - t1, "loss_backward": t3 - t2, "step": t4 - t0}

    backwards = {
        "parameter_backward": lambda loss: parameter_backward(loss, model),
        "loss.backward()": lambda loss: loss.backward(),
    }
    for backward in backwards.values():  # warm-up: compiling, the line kernel's build, allocator
        step(backward)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in backwards}
    for r in range(args.rounds):
        for name in backwards if r % 2 == 0 else reversed(backwards):
            times[name].append(step(backwards[name]))
    matmul, _ = matmul_flops_per_s(device)

    rows = {}
    for name, runs in times.items():
        for phase in PHASES:
            best = min(run[phase] for run in runs)
            rows[f"{phase} ({name})"] = {
                "s": best,
                "median_s": statistics.median(run[phase] for run in runs),
                "gflop": flops[phase] / 1e9,
                "flop_efficiency": flops[phase] / best / matmul,
            }
    full, pruned = ([run["step"] for run in times[k]] for k in ("loss.backward()", "parameter_backward"))
    ratio = {"best": min(full) / min(pruned), "median": statistics.median(full) / statistics.median(pruned)}

    table = Table(
        title=f"matris-6l training step by phase, {batch.num_atoms} atoms, {batch.num_edges:,} edges, "
        f"{device.type}, {torch.get_num_threads()} threads, {args.rounds} rounds alternating; "
        f"matmul {matmul / 1e9:.0f} GFLOP/s"
    )
    for column in ("phase (backward)", "best s", "median s", "GFLOP", "GFLOP/s", "FLOP eff."):
        table.add_column(column, justify="left" if column.startswith("phase") else "right")
    for name, r in rows.items():
        table.add_row(
            name, f"{r['s']:.3f}", f"{r['median_s']:.3f}", f"{r['gflop']:.0f}",
            f"{r['gflop'] / r['s']:.0f}", f"{100 * r['flop_efficiency']:.1f}%",
        )
    console = Console(width=140)
    console.print(table)
    console.print(
        f"step with loss.backward() ÷ step with parameter_backward: best {ratio['best']:.3f}, "
        f"median {ratio['median']:.3f}"
    )
    report = {"device": device.type, "threads": torch.get_num_threads(), "matmul_flops_per_s": matmul,
              "rows": rows, "full_over_parameter_backward": ratio}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
