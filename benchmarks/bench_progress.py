"""What watching a run costs: the live progress's reading of the run directory, and `parsl-run status`'s.

    python benchmarks/bench_progress.py [--steps 100000] [--chunks 2000] [--polls 400]

Builds a run directory the size of a long run (``--steps`` lines of ``train/metrics.jsonl`` shaped like the
trainer's, a validation every 500 steps, ``--chunks`` chunk summaries), then times (1) the first reading,
which `parsl-run status` pays once, and (2) the steady polls of the live view (`workflows.progress`), each
after one more step is appended, rendered in plain mode: the CPU seconds of the polling thread per poll, and
that as a share of one core at the view's rate (``POLL_S``). The training ranks are other processes; this
share is what the view can take from them; also the polls while data preparation runs, a chunk
finishing before each one (the chunk summaries listed each time). Prints a table and, with
``--json FILE``, writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from workflows.progress import POLL_S, PlainView, Watcher
from workflows.runstate import RunReader

TASKS = ("alloy-emt", "crystal-pbe", "crystal-r2scan", "molecule-gfn2")


def training_record(step: int) -> dict:
    """A line shaped like `janus.train`'s (its keys, per-task losses, ~1.3 kB)."""
    record = {"step": step, "epoch": step // 500, "loss": 1.0 / step}
    record |= {f"{t}/{k}": 0.5 for t in TASKS for k in ("energy", "force", "stress")}
    record |= {"grad_norm": 1.0, "lr": 4e-3, "atoms": 256, "edges": 9000, "step_time_s": 0.4,
               "atoms_per_s": 640.0, "peak_memory_bytes": 2 << 30, "world_size": 1, "torch_threads": 2,
               "layout": [1, 1, 1], "peak_memory_bytes_max": 2 << 30, "flops": 1e11, "tflops_per_s": 0.25,
               "flop_efficiency": 0.1, "expert_imbalance": 1.0, "elapsed_s": 0.45 * step}  # fmt: skip
    return record


def validation_record(step: int, weights: str) -> dict:
    errors = {"energy_mae_mev_per_atom": 50.0, "force_mae_mev_per_a": 300.0,
              "force_zero_mae_mev_per_a": 500.0, "force_cosine": 0.6}  # fmt: skip
    return {"step": step, "kind": "validation", "weights": weights, "score": 1.0, "best": False,
            "tasks": dict.fromkeys(TASKS, errors), "seconds": 3.0}  # fmt: skip


def build(root: Path, steps: int, chunks: int) -> None:
    (root / "train").mkdir(parents=True)
    (root / "data" / "parts").mkdir(parents=True)
    with (root / "train" / "metrics.jsonl").open("w") as handle:
        for step in range(1, steps + 1):
            handle.write(json.dumps(training_record(step)) + "\n")
            if step % 500 == 0:
                for weights in ("model", "ema"):
                    handle.write(json.dumps(validation_record(step, weights)) + "\n")
    ids = [f"chunk-{k:06d}" for k in range(chunks)]
    (root / "data" / "plan.json").write_text(json.dumps({"fingerprint": "f", "chunks": ids}))
    for chunk_id in ids:
        summary = {"fingerprint": "f", "n_structures": 1000, "n_rejected": 3, "shards": [], "stats": {}}
        (root / "data" / "parts" / f"{chunk_id}.json").write_text(json.dumps(summary))
    (root / "run_config.yaml").write_text(f"train:\n  steps: {steps * 2}\n  time_budget_s: null\n")
    stages = {name: {"status": s, "start": time.time(), "end": None, "detail": ""}
              for name, s in (("data", "ran"), ("train", "running"), ("export", "pending"))}  # fmt: skip
    (root / "summary.json").write_text(json.dumps({"site": "local", "state": "running", "stages": stages}))


def measure(root: Path, steps: int, polls: int) -> dict:
    tic = time.perf_counter()
    RunReader(root).read()
    first = time.perf_counter() - tic
    watcher = Watcher(RunReader(root), PlainView(Console(file=io.StringIO(), width=100)))
    watcher.show()
    cpu = []
    with (root / "train" / "metrics.jsonl").open("a") as metrics:
        for step in range(steps + 1, steps + polls + 1):
            metrics.write(json.dumps(training_record(step)) + "\n")
            metrics.flush()
            start = time.thread_time()
            watcher.show()
            cpu.append(time.thread_time() - start)
    per_poll = statistics.median(cpu)
    return {"metrics_lines": steps, "first_read_s": first, "poll_cpu_ms_median": per_poll * 1e3,
            "poll_cpu_ms_p95": sorted(cpu)[int(0.95 * len(cpu))] * 1e3,
            "core_share_at_poll_rate_pct": per_poll / POLL_S * 100}  # fmt: skip


def data_polls(root: Path, polls: int) -> float:
    """Median CPU seconds of a poll while data preparation runs, a chunk finishing before each poll (the
    worst case: the chunk summaries are listed every time)."""
    watcher = Watcher(RunReader(root), PlainView(Console(file=io.StringIO(), width=100)))
    cpu = []
    for k in range(polls):
        (root / "data" / "parts" / f"finished-{k}.json").write_text("{}")
        start = time.thread_time()
        watcher.show()
        cpu.append(time.thread_time() - start)
    return statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=400)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), args.steps, args.chunks)
        size = (Path(folder) / "train" / "metrics.jsonl").stat().st_size
        figures = {
            "metrics_bytes": size,
            "chunks": args.chunks,
            **measure(Path(folder), args.steps, args.polls),
        }
        summary = Path(folder) / "summary.json"
        summary.write_text(summary.read_text().replace('"ran"', '"running"', 1))  # the data stage
        figures["poll_cpu_ms_during_data_median"] = data_polls(Path(folder), args.polls) * 1e3
    print(f"{'measure':34s} value")
    for key, value in figures.items():
        print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
