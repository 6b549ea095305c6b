"""Is data loading a bottleneck? Loader throughput against the training-step rate of the models.

    python benchmarks/bench_loader.py [--data DIR] [--max-atoms 512] [--epochs 2] [--steps 2]

Prepares ``sample_data/`` with ``data_prep.prepare`` into a temp dir (or reads ``--data``, a prepared
directory), then times on the train split, batches planned by ``BatchPlan`` under ``--max-atoms``:

- the loader: ``GraphDataset`` items → ``matris.batch.collate``, in this process and through a torch
  ``DataLoader`` with 2 forked workers (worker start-up included; ``--epochs`` passes over the plan);
- one training step per preset: ``matris.predict(training=True)`` → ``matris.multitask_loss`` →
  ``backward`` on the same batches (first step untimed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.utils.data
from rich.console import Console
from rich.table import Table

import matris
from data_prep import BatchPlan, DataConfig, GraphDataset, prepare
from matris.batch import Batch, collate
from matris.properties import parameter_backward

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def timed(batches: Iterable[Batch]) -> dict:
    start = time.perf_counter()
    structures = atoms = count = 0
    for batch in batches:
        structures, atoms, count = structures + batch.num_structures, atoms + batch.num_atoms, count + 1
    elapsed = time.perf_counter() - start
    return {
        "batches": count,
        "seconds": elapsed,
        "structures_per_s": structures / elapsed,
        "atoms_per_s": atoms / elapsed,
        "batches_per_s": count / elapsed,
    }


def in_process(dataset: GraphDataset, plan: BatchPlan, epochs: int) -> Iterable[Batch]:
    for epoch in range(epochs):
        for indices in plan.batches(epoch):
            yield collate([dataset[i] for i in indices])


def with_workers(dataset: GraphDataset, plan: BatchPlan, epochs: int, workers: int) -> Iterable[Batch]:
    sampler = [indices for epoch in range(epochs) for indices in plan.batches(epoch)]
    yield from torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        multiprocessing_context="fork",
    )


def train_steps(preset: str, manifest: dict, batches: list[Batch]) -> dict:
    """Time predict → loss → backward on ``batches`` after one untimed step."""
    torch.manual_seed(0)
    model = matris.MatRIS(matris.ModelConfig.from_preset(preset, tasks=manifest["tasks"]))
    model.set_reference_energies(manifest["reference_energies"])
    params = sum(p.numel() for p in model.parameters())

    def step(batch: Batch) -> None:
        model.zero_grad(set_to_none=True)
        pred = matris.predict(model, batch, training=True)
        loss, _ = matris.multitask_loss(pred, batch, model.config.tasks)
        parameter_backward(loss, model)

    step(batches[0])
    result = timed(_after(step, batches[1:]))
    return {**result, "parameters": params}


def _after(step, batches: list[Batch]) -> Iterable[Batch]:
    for batch in batches:
        step(batch)
        yield batch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", type=Path, default=None, help="prepared data dir (default: sample_data)")
    parser.add_argument("--max-atoms", type=int, default=512, help="atom budget per batch")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the plan for the loader")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per preset")
    parser.add_argument("--presets", nargs="+", default=["tiny", "matris-6l"])
    return parser.parse_args(argv)


def run(data_dir: Path, args: argparse.Namespace) -> dict:
    dataset = GraphDataset(data_dir, split="train")
    plan = BatchPlan(dataset.sizes, max_atoms=args.max_atoms, seed=0)
    report: dict = {
        "structures": len(dataset),
        "atoms_per_structure": float(dataset.sizes[:, 0].mean()),
        "batches_per_epoch": plan.num_batches(0),
        "max_atoms": args.max_atoms,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    report["loader, 1 process"] = timed(in_process(dataset, plan, args.epochs))
    report["DataLoader, 2 workers"] = timed(with_workers(dataset, plan, args.epochs, 2))
    batches = list(in_process(dataset, plan, 1))
    batches = [batches[k % len(batches)] for k in range(args.steps + 1)]
    for preset in args.presets:
        report[f"train step, {preset}"] = train_steps(preset, dataset.manifest, batches)
    return report


def print_table(console: Console, report: dict) -> None:
    title = (
        f"{report['structures']} train structures, {report['atoms_per_structure']:.1f} atoms each, "
        f"batches ≤ {report['max_atoms']} atoms, {report['cores']} cores, torch threads "
        f"{report['torch_threads']}, load average {report['load_average']:.1f}"
    )
    table = Table(title=title)
    for column in ("what", "batches", "structures/s", "atoms/s", "batches/s", "s per batch"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, r in report.items():
        if not isinstance(r, dict):
            continue
        what = f"{name} ({r['parameters'] / 1e6:.2f} M params)" if "parameters" in r else name
        table.add_row(
            what,
            str(r["batches"]),
            f"{r['structures_per_s']:,.0f}",
            f"{r['atoms_per_s']:,.0f}",
            f"{r['batches_per_s']:.2f}",
            f"{1 / r['batches_per_s']:.4f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=160)
    if args.data is not None:
        report = run(args.data, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prepare(DataConfig(sources=sorted(SAMPLE.glob("*.extxyz.gz"))), Path(tmp))
            report = run(Path(tmp), args)
    loader = report["loader, 1 process"]["atoms_per_s"]
    for preset in args.presets:
        step = report[f"train step, {preset}"]["atoms_per_s"]
        report[f"loader share of a step, {preset}"] = step / (loader + step)
    print_table(console, report)
    for preset in args.presets:
        share = report[f"loader share of a step, {preset}"]
        console.print(f"in-process loading would take {share:.1%} of a {preset} step (loader ÷ step time)")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
