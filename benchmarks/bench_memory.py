"""Predicted against measured peak memory of training ranks (`janus.memory`), gloo, 1-4 ranks.

    python benchmarks/bench_memory.py [--json FILE] [--cases tiny,matris-6l,moe-s]

Each case is a real `janus.train.Trainer` run on 1-4 gloo ranks started with `torch.multiprocessing`
(environment as `janus.memory.measurement_env`, kernels as the preset's calibration was measured with).
After a warm-up step (lazy initialisation, AdamW state), a rank's *runtime* is its anonymous resident set
less the bytes of the tensors it keeps (parameter shards and AdamW moments, counted from the live
tensors): interpreter, libraries, gloo, caches. Each later step's peak (`janus.memory.PeakMemory`) less
that runtime is the measurement, with the atoms (owned and ghost), edges and triplets the rank computed.
The prediction is `janus.memory.estimate` for that work with the coefficients stored by ``python -m
janus.memory calibrate`` for the preset (``site_configs/calibration/local.json``); the planner adds a
1 GiB reserve per rank for the runtime. Reported per rank: the step with the largest measurement,
predicted and measured; target: every prediction within 15 %.

Models: ``tiny``, ``matris-6l`` and a ``moe-s``-width model (d = 768, expert width 1152, top-4, with 1
block and 8 experts; calibrated with 2 blocks, so the per-block scaling is tested too); layouts include
data, graph and expert sharding. ``tiny``'s graph sharding cuts the bundled sample's largest alloy cell
(1176 atoms) over the group; elsewhere the heaviest structure of a batch is cut.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from janus.memory import CALIBRATION_MODELS  # noqa: E402

# moe-s's widths with one block and 8 experts (calibrated with two: the per-block scaling is tested too)
MOE_S_WIDTH = {**CALIBRATION_MODELS["moe-s"], "num_blocks": 1, "moe_blocks": [0]}
# (preset, model overrides, (dp, graph, expert), data set, global atom budget)
CASES: list[tuple[str, dict, tuple[int, int, int], str, int]] = [
    ("tiny", {}, (1, 1, 1), "mix", 512),
    ("tiny", {}, (2, 1, 1), "mix", 1024),
    ("tiny", {}, (1, 2, 1), "alloy", 2048),
    ("tiny", {}, (1, 1, 2), "mix", 1024),
    ("tiny", {}, (1, 2, 2), "mix", 1024),
    ("matris-6l", {}, (1, 1, 1), "mix", 128),
    ("matris-6l", {}, (1, 2, 1), "mix", 128),
    ("moe-s", MOE_S_WIDTH, (1, 1, 1), "mix", 64),
    ("moe-s", MOE_S_WIDTH, (2, 1, 1), "mix", 96),
    ("moe-s", MOE_S_WIDTH, (1, 1, 2), "mix", 96),
]
STEPS = 3  # the first is the warm-up


def rank_work(trainer: Any, global_batch: list[int]) -> dict[str, float]:
    """Atoms (owned and ghosts), edges, triplets and ghosts this rank computes for ``global_batch``."""
    from janus.batching import assign
    from matris.graph import count_triplets

    sizes = trainer.dataset.sizes
    work = assign(global_batch, sizes, trainer.where)
    atoms, edges, triplets = (float(v) for v in sizes[work.whole].sum(axis=0)) if work.whole else (0, 0, 0)
    ghosts = 0.0
    cutoff = trainer.model_cfg.three_body_cutoff
    for i in work.partitioned:
        g = trainer.dataset[i]
        own = trainer._partition(i, g) == trainer.where.graph
        centre, neighbour = g.edge_index
        mine = own[centre]
        foreign = np.unique(neighbour[mine & ~own[neighbour]])
        vector = g.positions[neighbour] + g.edge_shift @ g.cell - g.positions[centre]
        length = np.where(mine, np.linalg.norm(vector, axis=1), np.inf)
        ghosts += len(foreign)
        atoms += float(own.sum()) + len(foreign)
        edges += float(mine.sum())
        triplets += count_triplets(centre, length, g.n_atoms, cutoff)
    return {"atoms": atoms, "edges": edges, "triplets": triplets, "ghosts": ghosts}


def tensor_bytes(trainer: Any) -> int:
    """Bytes of the tensors a trainer keeps between steps: its parameter shards and AdamW state."""
    from janus.parallel import local

    tensors = [local(p) for p in trainer.model.parameters()]
    tensors += [local(v) for state in trainer.optimizer.state.values() for v in state.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from janus import launch
    from janus.config import JanusConfig
    from janus.memory import PeakMemory
    from janus.train import Trainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    meter = PeakMemory(torch.device("cpu"))
    start = meter.current()
    trainer = Trainer(JanusConfig.model_validate(cfg), launch.DistEnv(rank, world, rank, "127.0.0.1", 0, "b"))
    trainer.step(0)  # warm-up: kernels compiled, AdamW state allocated
    live = tensor_bytes(trainer)
    runtime = meter.current() - live  # everything but tensors: interpreter, libraries, compiled kernels
    steps = []
    for step in range(1, STEPS):
        work = rank_work(trainer, trainer.global_batch(step)[1])
        meter.reset()
        trainer.step(step)
        steps.append({**work, "peak_bytes": meter.peak() - runtime})
    result = {"rank": rank, "steps": steps, "runtime_bytes": runtime - start, "live_bytes": live}
    Path(f"{out}.rank{rank}").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_case(case: tuple, data: dict[str, Path], tmp: Path) -> list[dict[str, Any]]:
    preset, overrides, layout, data_name, budget = case
    world = int(np.prod(layout))
    cfg = {
        "model": {"preset": preset, "overrides": overrides},
        "parallel": dict(zip(("dp", "graph", "expert"), layout, strict=True)),
        "train": {"steps": 100, "warmup_steps": 1, "max_atoms_per_batch": budget, "eval_every": 0,
                  "peak_tflops": 1.0, "seed": 1},
        "data_dir": str(data[data_name]),
        "out_dir": str(tmp / "out"),
    }  # fmt: skip
    from janus.memory import load_calibrations

    kernels = load_calibrations("local")[preset].kernels
    os.environ["MATRIS_COMPILE"] = "1" if kernels == "compiled" else "0"  # read by the spawned ranks
    shutil.rmtree(tmp / "out", ignore_errors=True)
    store = tmp / "store"
    store.unlink(missing_ok=True)
    out = tmp / "case"
    mp.spawn(_worker, args=(world, str(store), cfg, str(out)), nprocs=world)
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]


def predict(case: tuple, tasks: list[str], work: dict[str, float]) -> dict[str, float]:
    from janus.config import ParallelConfig
    from janus.memory import RankWork, estimate, load_calibrations
    from matris.config import ModelConfig

    preset, overrides, layout, _, _ = case
    model = ModelConfig.from_preset(preset, tasks=tasks, **overrides)
    parallel = ParallelConfig(**dict(zip(("dp", "graph", "expert"), layout, strict=True)))
    calibration = load_calibrations("local")[preset]
    fields = {k: work[k] for k in ("atoms", "edges", "triplets", "ghosts")}
    result = estimate(model, parallel, RankWork(**fields), calibration)
    return {"total": result.total, "state": result.state, "activations": result.activations + result.halo}


def prepare(inputs: list[Path], out: Path) -> Path:
    cmd = [sys.executable, "-m", "data_prep", *map(str, inputs), "--out", str(out), "--val-fraction", "0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | layout (dp, graph, expert) | rank | atoms | edges | triplets | runtime MiB | state MiB "
        "| predicted MiB | measured MiB | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {tuple(r['layout'])} | {r['rank']} | {r['atoms']:.0f} | {r['edges']:.0f} | "
            f"{r['triplets']:.0f} | {r['runtime'] / 2**20:.0f} | {r['state'] / 2**20:.0f} | "
            f"{r['predicted'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | {r['error']:+.1%} |"
        )
    worst = max(abs(r["error"]) for r in rows)
    lines.append(f"\nworst error {worst:.1%} (target: within 15 %): {'met' if worst <= 0.15 else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from janus.memory import measurement_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cases", default="tiny,matris-6l,moe-s", help="presets to run, comma-separated")
    args = parser.parse_args(argv)
    os.environ.update(measurement_env())  # inherited by the spawned ranks
    presets = args.cases.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        sample = ROOT / "sample_data"
        data = {"mix": prepare(sorted(sample.glob("*.extxyz.gz")), tmp / "mix")}
        import ase.io

        frames = ase.io.read(sample / "alloys_emt.extxyz.gz", index=":")
        ase.io.write(tmp / "alloy.extxyz", max(frames, key=len))
        data["alloy"] = prepare([tmp / "alloy.extxyz"], tmp / "alloy")
        for case in (c for c in CASES if c[0] in presets):
            tasks = json.loads((data[case[3]] / "manifest.json").read_text())["tasks"]
            for result in run_case(case, data, tmp):
                step = max(result["steps"], key=lambda s: s["peak_bytes"])
                predicted = predict(case, tasks, step)
                row = {
                    "model": case[0] + (" width (1 block, 8 experts)" if case[1] else ""),
                    "layout": list(case[2]), "rank": result["rank"], **step,
                    "runtime": result["runtime_bytes"],
                    "state": predicted["state"], "predicted": predicted["total"],
                    "measured": step["peak_bytes"], "error": predicted["total"] / step["peak_bytes"] - 1,
                }  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
