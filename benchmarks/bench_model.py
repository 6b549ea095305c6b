"""Training-step throughput, peak memory and FLOP efficiency of MatRIS, beside the published MatRIS, MACE
and CHGNet, on one batch of crystals.

    python benchmarks/bench_model.py [--input FILE] [--structures 32] [--pub-structures 4] [--steps 3]
                                     [--threads N] [--device cpu|cuda] [--peers-python PATH]
                                     [--only NAME ...] [--variant KEY=VALUE[,KEY=VALUE] ...]
                                     [--json PATH]

The batch is the first ``--structures`` structures of ``--input`` with at least 12 Å³ per atom. Every model
runs in a fresh subprocess, one after the other, so ``ru_maxrss`` is that model's peak and no two models
share memory. A step is forward, forces and stress with ``create_graph=True``, the loss, backward and an
AdamW step; the step time is the best of ``--steps`` steps after one untimed warm-up step (on a shared
machine the median, also in the JSON, moves with other jobs).

Ours (float32, random weights): ``matris-6l`` and ``matris-6l-moe``, the same model with both feed-forward
layers of all six blocks as MoE layers of 8 experts, top-2, expert hidden width 128: two active experts have
exactly the parameters of the dense 256-wide gated MLP they replace, so ``matris-6l`` is the dense model with
the MoE's active parameter count. FLOPs are ``matris.flops.model_flops`` (matmuls of forward, force backward
and parameter backward); FLOP efficiency divides a step's FLOPs per second by the FLOPs per second of a 4096²
fp32 matmul (best of 2) timed in the same process right after that step, and is the median of that ratio over
the timed steps: the speed of a shared machine drifts by 10-20 % within minutes, and a reference taken minutes
away from the steps moved the figure by as much. "matmul time" is the share of one profiled step
(``torch.profiler``) spent in ``mm``/``addmm``/``bmm``, and "matmul eff." those kernels' own FLOP rate (FLOPs
from their input shapes over their time) over the reference matmul's (for the peers, the reference of
``matris-6l`` in the same run). FLOP efficiency is their product (up to the profiler's overhead), and "matmul
eff." is what a step of matmuls alone would reach: the batches' matmuls are tall and thin, (edges × 128) by
(128 × 128), or batched and small, and run below the square reference. On a GPU "FP32-peak eff." also divides
by the card's FP32 (non-tensor-core) peak from ``janus.flops.FP32_PEAK``, the measure of the published MatRIS
paper, and "GPU busy" is the summed kernel time of one profiled step over the step time: low when the host,
which launches the kernels one by one, sets the pace (every model, peers included, is profiled the same way).
"CPU s/step" is the process CPU time of the fastest step (all threads) and "CPU FLOP eff." divides FLOPs per
CPU second by the matmul's FLOPs per CPU second (paired and the median, as above): unlike wall time it does
not count the time other jobs hold the cores, so it stays meaningful on a shared machine (with 2 threads it
includes OpenMP's spin-waiting). ``--threads 1`` is the robust setting when other jobs run: two OpenMP threads
wait for each other at every parallel region.

Peers run in their own venv (``--peers-python``) through ``_peers_model.py``: the published MatRIS (PyPI
``matris`` 0.1.0, ``num_layers=6``) on the first ``--pub-structures`` structures only, because it needs
≈17 GB for 4 of them (throughput is compared per atom, memory against ``matris-6l`` on the same 4), MACE
(128x0e, max_ell 3, 2 interactions, r_max 6 Å) and CHGNet's architecture on the whole batch.

``--variant`` adds a row of ``matris-6l`` with some `matris.ModelConfig` fields changed, e.g.
``--variant num_heads=4 --variant three_body_cutoff=1`` (a 1 Å line graph has no triplets: the model
without line attention), so that what an architecture choice costs or saves is measured beside the
preset in one run. Values are JSON where they parse as JSON, strings otherwise; the fields are validated
before any model runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import ase.io
import numpy as np
import torch
from _step_timing import profile_step, time_steps
from ase import Atoms
from rich.console import Console
from rich.table import Table

from janus.flops import table_peak_flops
from matris import LossConfig, MatRIS, ModelConfig, multitask_loss, predict
from matris.batch import Batch, collate
from matris.flops import model_flops
from matris.graph import graph_from_atoms
from matris.moe import Experts
from matris.properties import parameter_backward

DATA = Path(__file__).resolve().parents[1] / "sample_data"  # every crystals_pbe frame of the shared data
PEERS_HELPER = Path(__file__).with_name("_peers_model.py")
MIN_VOLUME_PER_ATOM = 12.0  # Å³
MODELS = {
    "matris-6l": ModelConfig.from_preset("matris-6l"),
    "matris-6l-moe": ModelConfig.from_preset(
        "matris-6l", moe_blocks=list(range(6)), num_experts=8, top_k=2, expert_hidden=128
    ),
}
PEERS = {"matris-pub": "published MatRIS 0.1.0", "mace": "MACE", "chgnet": "CHGNet"}
PUB_MIN_FREE_GB = 18.0  # the published MatRIS peaks at ≈17 GB on 4 structures


def select(path: Path, count: int) -> list[Atoms]:
    """The first ``count`` structures of ``path`` with at least 12 Å³ per atom."""
    chosen = []
    for atoms in ase.io.iread(path, format="extxyz"):
        if atoms.get_volume() / len(atoms) >= MIN_VOLUME_PER_ATOM:
            chosen.append(atoms)
            if len(chosen) == count:
                break
    return chosen


def labelled_batch(frames: list[Atoms], cutoff: float) -> Batch:
    graphs = [
        replace(
            graph_from_atoms(a, cutoff),
            energy=float(a.info["REF_energy"]),
            forces=np.asarray(a.arrays["REF_forces"]),
            stress=np.reshape(a.info["REF_stress"], (3, 3)),
        )
        for a in frames
    ]
    return collate(graphs)


def matmul_flops_per_s(device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """FLOPs per wall second and per CPU second (all threads) of the best of ``repeats`` fp32 matmuls.

    n = 4096 on the CPU, 8192 on a GPU, with TF32 off so that the reference is the FP32 rate."""
    n = 8192 if device.type == "cuda" else 4096
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    timing = time_steps(lambda: a @ b, repeats, device)
    return 2 * n**3 / timing["step_s"], 2 * n**3 / timing["cpu_step_s"]


def active_params(model: MatRIS) -> int:
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    return total - experts + experts * config.top_k // config.num_experts


def variant_config(spec: str) -> ModelConfig:
    """``matris-6l`` with the fields of ``spec`` ("key=value,key=value") changed, validated."""
    overrides = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--variant {spec!r}: {item!r} is not KEY=VALUE")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return ModelConfig.from_preset("matris-6l", **overrides)


def measure(name: str, frames_path: Path, steps: int, device: torch.device, variant: str = "") -> dict:
    """One of our models (``variant``: see `variant_config`), in this process: step times, memory, FLOPs
    and the matmul rate."""
    config = variant_config(variant) if variant else MODELS[name]
    batch = labelled_batch(ase.io.read(frames_path, ":", format="extxyz"), config.cutoff).to(device)
    torch.manual_seed(0)
    model = MatRIS(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_config = LossConfig()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = multitask_loss(predict(model, batch, training=True), batch, config.tasks, loss_config)
        parameter_backward(loss, model)
        optimizer.step()

    # the reference matmul right after every timed step, so that each step is divided by the machine's
    # rate of that moment: on a shared machine the rate drifts by 10-20 % within minutes
    timing = time_steps(step, steps, device, after_each=lambda: matmul_flops_per_s(device, repeats=2))
    references = timing.pop("after_each")
    profile = profile_step(step, device, timing["step_s"])
    flops = model_flops(model, batch)
    matmul, matmul_cpu = (statistics.median(r[i] for r in references) for i in (0, 1))

    def efficiency(clock: str, i: int) -> float:
        """Median over the timed steps of FLOPs per second over the reference matmul's right after."""
        return statistics.median(
            flops["total"] / t / r[i] for t, r in zip(timing[clock][1:], references, strict=True)
        )

    peak = table_peak_flops(device)  # the card's FP32 peak, the paper's measure; None on CPUs
    return {
        "model": name,
        "structures": batch.num_structures,
        "atoms": batch.num_atoms,
        "edges": batch.num_edges,
        "params": sum(p.numel() for p in model.parameters()),
        "active_params": active_params(model),
        **timing,
        **profile,
        "atoms_per_s": batch.num_atoms / timing["step_s"],
        "flops": flops,
        "flops_per_s": flops["total"] / timing["step_s"],
        "matmul_flops_per_s": matmul,
        "matmul_flops_per_s_after_steps": [r[0] for r in references],
        "flop_efficiency": efficiency("step_times_s", 0),
        "matmul_flops_per_cpu_s": matmul_cpu,
        "cpu_flop_efficiency": efficiency("cpu_step_times_s", 1),
        "fp32_peak_efficiency": peak and flops["total"] / timing["step_s"] / peak,
    }


def run_json(command: list[str], threads: int, console: Console) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        console.print(f"[yellow]{' '.join(command[-6:])} failed:[/yellow] {done.stderr.strip()[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def mem_available_gb() -> float:
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) * 1024 / 1e9


def targets(results: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets, each with its measured value, limit and verdict (absent if not measured).

    The FLOP-efficiency and MoE targets are also given on CPU time, which other jobs on a shared machine
    do not inflate."""
    dense, moe = results.get("matris-6l"), results.get("matris-6l-moe")
    pub, dense_pub = results.get("matris-pub"), results.get("matris-6l@pub")
    checks = []  # (name, value, at least (else at most), limit)
    if dense and pub:
        ratio = dense["atoms_per_s"] / pub["atoms_per_s"]
        checks.append(("throughput vs published MatRIS (per atom)", ratio, True, 3.0))
    if dense_pub and pub:
        ratio = dense_pub["peak_gb"] / pub["peak_gb"]
        checks.append(("peak memory vs published MatRIS (same batch)", ratio, False, 0.25))
    if dense:
        checks.append(("matris-6l FLOP efficiency", dense["flop_efficiency"], True, 0.40))
        checks.append(("matris-6l FLOP efficiency (CPU time)", dense["cpu_flop_efficiency"], True, 0.40))
    if dense and moe:
        for clock, suffix in (("step_s", ""), ("cpu_step_s", " (CPU time)")):
            ratio = moe[clock] / dense[clock]
            checks.append((f"MoE step time vs dense of equal active params{suffix}", ratio, False, 1.2))
    return {
        name: {
            "value": value,
            "limit": f"{'>=' if at_least else '<='} {limit:g}",
            "met": value >= limit if at_least else value <= limit,
        }
        for name, value, at_least, limit in checks
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def print_table(console: Console, results: dict[str, dict], title: str) -> None:
    table = Table(title=title)
    columns = (
        "model",
        "structures",
        "atoms",
        "params M",
        "best step s",
        "CPU s/step",
        "atoms/s",
        "peak GB",
        "step Δ GB",
        "GFLOP/step",
        "FLOP eff.",
        "CPU FLOP eff.",
        "FP32-peak eff.",
        "GPU busy",
        "matmul time",
        "matmul eff.",
        "6l ÷ row: atoms/s",
        "6l ÷ row: peak mem",
    )
    table.add_column(columns[0], overflow="fold")  # variants' names are long: wrap, never cut
    for column in columns[1:]:
        table.add_column(column, justify="right")
    dense = results.get("matris-6l")
    for key, r in results.items():
        same_batch = next(
            (
                o
                for k, o in results.items()
                if k.startswith("matris-6l") and "moe" not in k and o["structures"] == r["structures"]
            ),
            None,
        )
        flops = r.get("flops", {}).get("total")
        reference = r.get("matmul_flops_per_s") or (dense and dense["matmul_flops_per_s"])
        table.add_row(
            key if key in MODELS or key.startswith("matris-6l") else PEERS[key],
            str(r["structures"]),
            str(r["atoms"]),
            f"{r['params'] / 1e6:.2f}",
            f"{r['step_s']:.2f}",
            f"{r['cpu_step_s']:.2f}",
            f"{r['atoms_per_s']:.1f}",
            f"{r['peak_gb']:.2f}",
            f"{r['step_gb']:.2f}",
            fmt(flops and flops / 1e9, ",.0f"),
            *(
                percent(r.get(key))
                for key in (
                    "flop_efficiency",
                    "cpu_flop_efficiency",
                    "fp32_peak_efficiency",
                    "gpu_busy",
                    "matmul_time_share",
                )
            ),
            percent(reference and r["matmul_kernel_flops_per_s"] / reference),
            fmt(dense and dense["atoms_per_s"] / r["atoms_per_s"], ".2f"),
            fmt(same_batch and same_batch["peak_gb"] / r["peak_gb"], ".2f"),
        )
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--input", type=Path, default=DATA / "crystals_pbe.extxyz.gz")
    parser.add_argument("--structures", type=int, default=32)
    parser.add_argument("--pub-structures", type=int, default=4, help="batch of the published MatRIS")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per model (0: default)")
    parser.add_argument("--device", default="cpu", help="torch device of every model: cpu or cuda")
    parser.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    names = [*MODELS, "matris-6l@pub", *PEERS]
    parser.add_argument("--only", nargs="+", choices=names, default=names, help="run these models only")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="also run matris-6l with these ModelConfig fields changed (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON report here")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        device = torch.device(args.device)
        print(json.dumps(measure(args.worker, args.frames, args.steps, device, args.worker_variant)))
        return 0
    console = Console(width=240)
    if not args.input.is_file():
        console.print(f"[red]error:[/red] input file not found: {args.input}")
        return 1
    for spec in args.variant:
        try:
            variant_config(spec)
        except ValueError as error:  # pydantic's ValidationError included
            console.print(f"[red]error:[/red] --variant {spec!r}: {error}")
            return 1
    report: dict = {"cores": os.cpu_count(), "load_average_start": os.getloadavg()[0], "results": {}}
    results = report["results"]
    frames = select(args.input, args.structures)
    with tempfile.TemporaryDirectory() as tmp:
        batch_file, pub_file = Path(tmp) / "batch.extxyz", Path(tmp) / "pub.extxyz"
        ase.io.write(batch_file, frames, format="extxyz")
        ase.io.write(pub_file, frames[: args.pub_structures], format="extxyz")
        common = ["--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
        ours = [(name, name, batch_file, "") for name in MODELS if name in args.only]
        ours += [(f"matris-6l {spec}", "matris-6l", batch_file, spec) for spec in args.variant]
        if "matris-6l@pub" in args.only:
            ours.append(("matris-6l@pub", "matris-6l", pub_file, ""))
        for key, name, path, spec in ours:
            command = [sys.executable, __file__, "--worker", name, "--frames", str(path), *common]
            results[key] = run_json([*command, "--worker-variant", spec], args.threads, console)
        for peer in PEERS:
            if peer not in args.only:
                continue
            if not Path(args.peers_python).exists():
                console.print(f"[yellow]{peer} skipped: {args.peers_python} not found[/yellow]")
                continue
            free = mem_available_gb()
            if peer == "matris-pub" and args.device == "cpu" and free < PUB_MIN_FREE_GB:
                console.print(
                    f"[yellow]matris-pub skipped: {free:.1f} GB available, needs {PUB_MIN_FREE_GB}[/]"
                )
                continue
            path = pub_file if peer == "matris-pub" else batch_file
            command = [args.peers_python, str(PEERS_HELPER), "--model", peer, "--input", str(path), *common]
            results[peer] = run_json(command, args.threads, console)
    for key in [k for k, v in results.items() if v is None]:
        del results[key]
    report["load_average_end"] = os.getloadavg()[0]
    report["targets"] = targets(results)
    threads = {r["threads"] for r in results.values()}
    devices = ", ".join(sorted({r["device"] for r in results.values()}))
    memory = "torch.cuda.max_memory_allocated" if args.device != "cpu" else "peak RSS"
    # every model's process inherits LD_PRELOAD: a preloaded allocator (tcmalloc) changes CPU step times
    report["ld_preload"] = os.environ.get("LD_PRELOAD", "")
    allocator = Path(report["ld_preload"]).name or "glibc malloc"
    title = (
        f"training step, float32 on {devices} ({memory}, {allocator}), {os.cpu_count()} cores, torch threads "
        f"{sorted(threads)}, load average "
        f"{report['load_average_start']:.1f} → {report['load_average_end']:.1f}; "
        f"published MatRIS on {args.pub_structures} structures, the rest on {len(frames)}"
    )
    print_table(console, results, title)
    for name, t in report["targets"].items():
        verdict = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        console.print(f"{name}: {t['value']:.2f} (target {t['limit']}) {verdict}")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
