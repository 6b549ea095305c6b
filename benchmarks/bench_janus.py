"""Janus benchmark: sharded state, activation memory, communication, planner time, step-time scaling.

    python benchmarks/bench_janus.py [--data DIR] [--json FILE] [--quick]

Prints one table per figure and, last, everything as JSON (also written to ``--json``). Processes are
real gloo ranks started with `torch.multiprocessing`, each running `janus.train.Trainer` steps:

* state: per-rank bytes of parameters, gradients and AdamW state (local shards, max over ranks) of a
  medium MoE model (4 MoE blocks, d = 128, 8 experts of width 256) on 1, 2 and 4 ranks of FSDP, and
  with the experts sharded over 2 and 4 ranks (FSEP); target: within 10 % of 1/N of one rank.
* activations: bytes of the tensors autograd keeps for the backward passes (unique storages, parameters
  and inputs excluded: what the forward and the force backward with ``create_graph`` hold until the
  loss backward) for the largest alloy cell of the bundled sample, graph groups of 1, 2 and 4;
  target: at most 1.2/N of one rank.
* communication: payload bytes per rank of every collective in one step, by phase (forward, force
  backward, the loss between the passes, loss backward, gradient reduction) and by collective, counted
  at the dispatcher (`TorchDispatchMode`).
* planner: time of one expert plan (counts from histograms, water-filling, this rank's send/receive
  counts) for 64 experts over 128 ranks, top-16 of 119 elements; target under 5 ms.
* scaling: step time of 2 data-parallel ranks against 1 at equal per-rank work (the global batch budget
  doubled), median over steps after the FLOP-counted ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MEDIUM = {
    "dim": 128, "num_heads": 8, "num_blocks": 4, "moe_blocks": [0, 1, 2, 3], "num_experts": 8, "top_k": 2,
    "num_shared_experts": 1, "expert_hidden": 256,
}  # fmt: skip


# -- measurement -----------------------------------------------------------------------------------------


class CommBytes(TorchDispatchMode):
    """Payload bytes of the collectives this rank calls, by phase of the training step and collective.

    Phases follow autograd: ``forward`` until the first backward, ``force_backward`` inside it, ``loss``
    between the two passes (loss statistics, the partitioned structures' sums), ``loss_backward`` inside
    the second, ``reduction`` after it (expert-gradient return, FSDP reduce-scatter)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._tasks: list[int] = []

    def _phase(self) -> str:
        task = torch._C._current_graph_task_id()
        if task != -1 and task not in self._tasks:
            self._tasks.append(task)
        if task != -1:
            return ("force_backward", "loss_backward")[min(self._tasks.index(task), 1)]
        return ("forward", "loss", "reduction")[min(len(self._tasks), 2)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        phase = self._phase()  # every op, so that a backward without collectives still opens its phase
        namespace, name = func.namespace, func.__name__
        if namespace in ("c10d", "_c10d_functional") and not any(w in name for w in ("wait", "wrap")):
            kind = _collective(name)
            tensors = [a for a in _flat(args) if isinstance(a, torch.Tensor)]
            self.bytes[phase][kind] += _payload(kind, namespace, tensors)
        return func(*args, **kwargs)


def _flat(items: Any) -> list[Any]:
    out = []
    for item in items:
        out.extend(_flat(item) if isinstance(item, list | tuple) else [item])
    return out


def _payload(kind: str, namespace: str, tensors: list[torch.Tensor]) -> int:
    """Bytes this rank puts into the collective: its shard for an all-gather, its whole input for a
    reduce-scatter, all-reduce or all-to-all (c10d in-place ops list outputs before inputs)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    if not sizes or kind == "barrier":
        return 0
    if kind == "all_gather":
        return min(sizes)
    if kind == "reduce_scatter":
        return max(sizes)
    if kind == "all_to_all" and namespace == "c10d" and len(sizes) > 1:
        return sizes[1]
    return sizes[0]


COLLECTIVES = (
    ("allgather", "all_gather"),
    ("all_gather", "all_gather"),
    ("reduce_scatter", "reduce_scatter"),
    ("alltoall", "all_to_all"),
    ("all_to_all", "all_to_all"),
    ("allreduce", "all_reduce"),
    ("all_reduce", "all_reduce"),
    ("broadcast", "broadcast"),
    ("barrier", "barrier"),
)


def _collective(name: str) -> str:
    return next((label for key, label in COLLECTIVES if key in name), name)


class SavedBytes:
    """Unique storage bytes of tensors saved for backward, parameters and leaf inputs excluded."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad) and tensor.device.type != "meta":
            try:
                storage = tensor.untyped_storage()
                self.storages[storage.data_ptr()] = max(
                    self.storages.get(storage.data_ptr(), 0), storage.nbytes()
                )
            except (RuntimeError, NotImplementedError):
                pass
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _local_bytes(tensors: Any) -> int:
    from janus.parallel import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


# -- one rank --------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, store: str, cfg: dict, steps: int, measure: list[str], out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from janus import launch
    from janus.config import JanusConfig
    from janus.train import Trainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    env = launch.DistEnv(rank, world, rank, "127.0.0.1", 0, "bench")
    trainer = Trainer(JanusConfig.model_validate(cfg), env)
    result: dict[str, Any] = {"rank": rank, "step_times": [], "records": []}

    grads: list[int] = []
    original_step = trainer.optimizer.step

    def step_and_measure(*args: Any, **kwargs: Any) -> Any:
        grads.append(_local_bytes(p.grad for p in trainer.model.parameters()))
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step_and_measure  # type: ignore[method-assign]
    for step in range(steps):
        saved, comm = SavedBytes(), CommBytes()
        last = step == steps - 1
        with (
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
            if (last and "activations" in measure)
            else _null(),
            comm if (last and "comm" in measure) else _null(),
        ):
            tic = time.perf_counter()
            record = trainer.step(step).record
            result["step_times"].append(time.perf_counter() - tic)
        result["records"].append(record)
        if last:
            result["activation_bytes"] = saved.total
            result["comm"] = {phase: dict(v) for phase, v in comm.bytes.items()}
            result["janus_bytes"] = dict(trainer.ctx.bytes)
    result["param_bytes"] = _local_bytes(trainer.model.parameters())
    result["grad_bytes"] = grads[-1]
    result["optim_bytes"] = _local_bytes(
        v for state in trainer.optimizer.state.values() for v in state.values()
    )
    import resource

    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save(result, f"{out}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def run(cfg: dict, steps: int, measure: list[str], tmp: Path, name: str) -> list[dict[str, Any]]:
    p = cfg["parallel"]
    world = p["dp"] * p["graph"] * p["expert"]
    out = tmp / name
    store = tmp / f"{name}.store"
    store.unlink(missing_ok=True)
    shutil.rmtree(cfg["out_dir"], ignore_errors=True)
    mp.spawn(_worker, args=(world, str(store), cfg, steps, measure, str(out)), nprocs=world)
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def config(data: Path, out: Path, layout: tuple[int, int, int], model: dict, **train: Any) -> dict:
    return {
        "model": {"preset": "tiny", "overrides": model},
        "parallel": dict(zip(("dp", "graph", "expert"), layout, strict=True)),
        "train": {"steps": 100, "warmup_steps": 1, "max_atoms_per_batch": 64, "peak_tflops": 1.0, **train},
        "data_dir": str(data),
        "out_dir": str(out),
    }


# -- the figures -----------------------------------------------------------------------------------------


def bench_state(small: Path, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    layouts = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (1, 1, 2), (1, 1, 4)]
    base = None
    for layout in layouts:
        ranks = run(config(small, tmp / "o", layout, MEDIUM), 1, ["comm"], tmp, "state")
        worst = {k: max(r[k] for r in ranks) for k in ("param_bytes", "grad_bytes", "optim_bytes")}
        total = sum(worst.values())
        base = base or total
        n = int(np.prod(layout))
        rows.append({"layout": list(layout), "ranks": n, **worst, "total_bytes": total,
                     "fraction_of_one_rank": total / base, "ideal": 1 / n,
                     "within_10pct_of_ideal": total / base <= 1.1 / n,
                     "comm": ranks[0]["comm"]})  # fmt: skip
    return rows


def bench_activations(alloy: Path, tmp: Path) -> list[dict[str, Any]]:
    rows, base = [], None
    for graph in (1, 2, 4):
        cfg = config(alloy, tmp / "o", (1, graph, 1), {}, max_atoms_per_batch=4096)
        ranks = run(cfg, 1, ["activations", "comm"], tmp, "act")
        peak = max(r["activation_bytes"] for r in ranks)
        base = base or peak
        last = ranks[0]["records"][-1]
        rows.append(
            {
                "graph": graph,
                "activation_bytes_max_rank": peak,
                "activation_bytes_per_rank": [r["activation_bytes"] for r in ranks],
                "fraction_of_one_rank": peak / base,
                "target": 1.2 / graph,
                "meets_target": peak / base <= 1.2 / graph,
                "peak_rss_bytes_max_rank": max(r["peak_rss_bytes"] for r in ranks),
                "atoms": last["atoms"],
                "edges": last["edges"],
                "comm": ranks[0]["comm"],
                "step_time_s": max(r["step_times"][-1] for r in ranks),
            }
        )
    return rows


def bench_comm_combined(small: Path, tmp: Path) -> dict[str, Any]:
    ranks = run(config(small, tmp / "o", (1, 2, 2), {}), 1, ["comm"], tmp, "comm")
    return {"layout": [1, 2, 2], "comm_rank0": ranks[0]["comm"], "janus_bytes_rank0": ranks[0]["janus_bytes"]}


def bench_planner(repeats: int = 300) -> dict[str, Any]:
    from janus.planner import expert_counts, plan

    rng = np.random.default_rng(0)
    ranks, experts, num_z, top_k = 128, 64, 119, 16
    histograms = rng.poisson(3.0, (ranks, num_z)) * (rng.random((ranks, num_z)) < 0.1)
    table = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(num_z)])
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        p = plan(expert_counts(histograms, table, experts))
        p.send_counts(7)
        p.recv_counts(7)
        times.append(time.perf_counter() - tic)
    median = statistics.median(times)
    return {
        "experts": experts,
        "ranks": ranks,
        "top_k": top_k,
        "median_ms": median * 1e3,
        "min_ms": min(times) * 1e3,
        "pieces": len(p.piece_len),
        "imbalance": p.imbalance,
        "static_imbalance": p.static_imbalance(),
        "meets_target": median < 5e-3,
    }


def bench_scaling(small: Path, tmp: Path, steps: int) -> dict[str, Any]:
    out = {}
    for dp in (1, 2):
        cfg = config(small, tmp / "o", (dp, 1, 1), {}, max_atoms_per_batch=128 * dp, dtype="float32")
        ranks = run(cfg, steps, [], tmp, "scale")
        times = [max(r["step_times"][s] for r in ranks) for s in range(2, steps)]  # after FLOP-counted steps
        out[f"dp{dp}"] = {"median_step_s": statistics.median(times), "atoms_per_step": statistics.median(
            [ranks[0]["records"][s]["atoms"] for s in range(2, steps)])}  # fmt: skip
    out["weak_scaling_efficiency"] = out["dp1"]["median_step_s"] / out["dp2"]["median_step_s"]
    return out


# -- output ----------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(results: dict[str, Any]) -> str:
    lines = []
    load = results["load_average"]
    lines.append(
        f"janus, {os.cpu_count()} cores, torch {torch.__version__}, gloo, load average {load:.1f} at start"
    )
    lines.append("")
    lines.append("per-rank parameter + gradient + AdamW state (MiB, max over ranks; medium MoE model)")
    lines.append(f"{'layout dp×graph×expert':>24} {'params':>9} {'grads':>9} {'optim':>9} {'total':>9} "
                 f"{'/ 1 rank':>9} {'1/N':>6} {'≤1.1/N':>7}")  # fmt: skip
    for row in results["state"]:
        layout = "×".join(map(str, row["layout"]))
        lines.append(
            f"{layout:>24} {mib(row['param_bytes']):>9} {mib(row['grad_bytes']):>9} "
            f"{mib(row['optim_bytes']):>9} {mib(row['total_bytes']):>9} {row['fraction_of_one_rank']:>9.3f} "
            f"{row['ideal']:>6.3f} {'yes' if row['within_10pct_of_ideal'] else 'NO':>7}"
        )
    lines.append("")
    act = results["activations"]
    lines.append(f"activation memory saved for the backward passes, {act[0]['atoms']}-atom alloy cell "
                 f"({act[0]['edges']} edges), tiny model fp32 (MiB, max over ranks)")  # fmt: skip
    lines.append(f"{'graph group':>12} {'activations':>12} {'/ 1 rank':>9} {'target':>7} {'met':>4} "
                 f"{'peak RSS':>9} {'step s':>7}")  # fmt: skip
    for row in act:
        lines.append(
            f"{row['graph']:>12} {mib(row['activation_bytes_max_rank']):>12} "
            f"{row['fraction_of_one_rank']:>9.3f} "
            f"{row['target']:>7.3f} {'yes' if row['meets_target'] else 'NO':>4} "
            f"{mib(row['peak_rss_bytes_max_rank']):>9} {row['step_time_s']:>7.2f}"
        )
    lines.append("")
    lines.append("communication payload per step, rank 0 (KiB) by phase and collective")
    comm_rows = [("FSDP dp=2, medium model", results["state"][1]["comm"]),
                 ("FSEP expert=2, medium model", results["state"][3]["comm"]),
                 ("FSGP graph=2, alloy cell", results["activations"][1]["comm"]),
                 ("graph=2 × expert=2, small data", results["combined"]["comm_rank0"])]  # fmt: skip
    phases = ("forward", "force_backward", "loss", "loss_backward", "reduction")
    lines.append(f"{'run':>30} {'collective':>15} " + " ".join(f"{p:>14}" for p in phases))
    for name, comm in comm_rows:
        kinds = sorted({k for phase in comm.values() for k in phase})
        for kind in kinds:
            values = " ".join(f"{comm.get(p, {}).get(kind, 0) / 1024:>14.1f}" for p in phases)
            lines.append(f"{name:>30} {kind:>15} {values}")
    lines.append("")
    p = results["planner"]
    met = "yes" if p["meets_target"] else "NO"
    lines.append(
        f"planner, {p['experts']} experts × {p['ranks']} ranks, top-{p['top_k']}: median "
        f"{p['median_ms']:.3f} ms (min {p['min_ms']:.3f}), {p['pieces']} pieces, imbalance "
        f"{p['imbalance']:.3f} (static placement {p['static_imbalance']:.2f}); under 5 ms: {met}"
    )
    s = results["scaling"]
    lines.append(f"step time at equal per-rank work (tiny fp32): 1 rank {s['dp1']['median_step_s']:.3f} s, "
                 f"2 ranks {s['dp2']['median_step_s']:.3f} s, weak-scaling efficiency "
                 f"{s['weak_scaling_efficiency']:.2f}")  # fmt: skip
    return "\n".join(lines)


def prepare(inputs: list[Path], out: Path) -> Path:
    cmd = [sys.executable, "-m", "data_prep", *map(str, inputs), "--out", str(out), "--val-fraction", "0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer scaling steps")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        sample = ROOT / "sample_data"
        small = prepare(
            [sample / "crystals_pbe.extxyz.gz", sample / "molecules_gfn2.extxyz.gz"], tmp / "small"
        )
        import ase.io

        frames = ase.io.read(sample / "alloys_emt.extxyz.gz", index=":")
        ase.io.write(tmp / "alloy.extxyz", max(frames, key=len))
        alloy = prepare([tmp / "alloy.extxyz"], tmp / "alloy")
        results["planner"] = bench_planner()
        results["state"] = bench_state(small, tmp)
        results["activations"] = bench_activations(alloy, tmp)
        results["combined"] = bench_comm_combined(small, tmp)
        results["scaling"] = bench_scaling(small, tmp, 6 if args.quick else 12)
    print(table(results))
    print(json.dumps(results, indent=1, default=float))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
