"""MoE training at the published size on CPU ranks: train, checkpoint, resume on another rank count, export
pruned, evaluate, each through the command users run, with each process's peak resident memory.

    python benchmarks/bench_moe_train.py [--preset moe-s] [--blocks N] [--experts E] [--top-k K] [--ranks 2]
        [--resume-ranks 1] [--steps 2] [--resume-steps 1] [--max-atoms 8] [--out DIR] [--json FILE]

1. data: the bundled molecules made of H, C and O only, at most 9 atoms each (24 of them, a quarter held
   out), prepared by ``python -m data_prep``: few elements route to few experts, so the pruned export is
   small, and tiny molecules keep the activations far below the model state;
2. train: ``python -m janus.train`` under torchrun on ``--ranks`` gloo ranks (as
   ``site_configs/local.py``'s ``train_command``), experts sharded over ``parallel.expert``, everything
   else FSDP, for ``--steps`` steps, then a checkpoint;
3. resume: the same run directory on ``--resume-ranks`` ranks for ``--resume-steps`` more (DCP reshards
   the checkpoint), then a checkpoint;
4. export: ``python -m janus.export --keep-elements`` with the training data's elements;
5. evaluate: ``python -m evaluation.evaluate`` on the held-out molecules.

Peak memory is each process's VmHWM, read from ``/proc/PID/status`` every 0.2 s while it runs (the ranks'
PIDs from ``train/ranks/``). Prints a table and the figures as JSON (also to ``--json``). At
``--experts 16`` the ranks need about 15 GiB together; keep other large jobs off the machine meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matris.config import ModelConfig  # noqa: E402

SAMPLE = ROOT / "sample_data" / "molecules_gfn2.extxyz.gz"
ELEMENTS = {"H", "C", "O"}
MAX_ATOMS = 9
N_MOLECULES = 24


def prepare_data(out: Path) -> Path:
    """The bench's molecules, prepared into ``out`` (kept if already there)."""
    if (out / "manifest.json").is_file():
        return out
    import gzip
    import io

    import ase.io

    text = gzip.decompress(SAMPLE.read_bytes()).decode()
    frames = ase.io.read(io.StringIO(text), ":", format="extxyz")
    chosen = [f for f in frames if set(f.get_chemical_symbols()) <= ELEMENTS and len(f) <= MAX_ATOMS]
    source = out.parent / "molecules_hco.extxyz"
    source.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(source, chosen[:N_MOLECULES], format="extxyz")
    cmd = [sys.executable, "-m", "data_prep", str(source), "--out", str(out), "--val-fraction", "0.25"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=600)
    return out


def layout(ranks: int, experts: int) -> dict[str, int]:
    """Experts over as many ranks as divide them, the rest data-parallel."""
    expert = max(e for e in range(1, ranks + 1) if ranks % e == 0 and experts % e == 0)
    return {"dp": ranks // expert, "graph": 1, "expert": expert}


def peak_rss(pid: int) -> int | None:
    """VmHWM of a live process, bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def run_measured(cmd: list[str], pids_dir: Path | None = None) -> dict[str, Any]:
    """Run ``cmd``; the peak memory of it (``pids_dir`` None) or of the ``rank*.pid`` processes there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    tic = time.perf_counter()
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, **pipe)
    peaks: dict[str, int] = {}

    def watch() -> None:
        while proc.poll() is None:
            found = {p.stem: p.read_text() for p in pids_dir.glob("rank*.pid")} if pids_dir else {}
            found = {k: int(v) for k, v in found.items() if v.isdigit()}  # not one half written
            for name, pid in (found if pids_dir else {"process": proc.pid}).items():
                peaks[name] = max(peaks.get(name, 0), peak_rss(pid) or 0)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = proc.communicate()[0]
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_s": time.perf_counter() - tic, "peak_rss_bytes": dict(sorted(peaks.items())), "log": output}


def train(cfg: dict[str, Any], run: Path, ranks: int) -> dict[str, Any]:
    """``janus.train`` under torchrun on ``ranks`` ranks, as the local site launches it."""
    config_file = run / f"train_{ranks}ranks.yaml"
    config_file.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    shutil.rmtree(run / "train" / "ranks", ignore_errors=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(ranks), "-m", "janus.train", "--config", str(config_file),
    ]  # fmt: skip
    return run_measured(cmd, pids_dir=run / "train" / "ranks")


def job_config(model: dict[str, Any], args: argparse.Namespace, run: Path, ranks: int, steps: int) -> dict:
    return {
        "model": model,
        "parallel": layout(ranks, ModelConfig.from_preset(model["preset"], **model["overrides"]).num_experts),
        "train": {
            "steps": steps,
            "warmup_steps": 0,
            "max_atoms_per_batch": args.max_atoms,
            "checkpoint_every": steps,
            "keep_checkpoints": 1,
            "eval_every": 0,
        },
        "data_dir": str(run / "data"),
        "out_dir": str(run / "train"),
    }


def model_choice(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.blocks is not None:
        overrides.update(num_blocks=args.blocks, moe_blocks=list(range(args.blocks)))
    if args.experts is not None:
        overrides["num_experts"] = args.experts
    if args.top_k is not None:
        overrides["top_k"] = args.top_k
    return {"preset": args.preset, "overrides": overrides}


def parameter_count(model: dict[str, Any]) -> int:
    import torch

    from matris.model import MatRIS

    with torch.device("meta"):
        built = MatRIS(ModelConfig.from_preset(model["preset"], **model["overrides"]))
    return sum(p.numel() for p in built.parameters())


def steps_of(run: Path) -> list[dict[str, Any]]:
    from janus.metrics import read, training_records

    keys = ("step", "loss", "step_time_s", "world_size", "peak_memory_bytes_max")
    return [{k: r[k] for k in keys} for r in training_records(read(run / "train" / "metrics.jsonl"))]


def build_cpu_kernels() -> None:
    """Build (or find cached) `matris.cpu_kernels`' extension before any stage, so that no timed step
    waits for g++ or for another checkout's build of the shared cache (``TORCH_EXTENSIONS_DIR``)."""
    from matris import cpu_kernels

    if cpu_kernels._State.enabled and os.environ.get("MATRIS_CPU_KERNELS", "1") != "0":
        with contextlib.suppress(OSError, RuntimeError, ImportError):  # training then warns once
            cpu_kernels._extension()


def bench(args: argparse.Namespace) -> dict[str, Any]:
    run = args.out
    if run.exists():
        shutil.rmtree(run)
    build_cpu_kernels()
    data = prepare_data(run / "data")
    model = model_choice(args)
    result: dict[str, Any] = {"model": model, "parameters": parameter_count(model), "stages": {}}
    total = args.steps + args.resume_steps
    for stage, ranks, steps in (("train", args.ranks, args.steps), ("resume", args.resume_ranks, total)):
        cfg = job_config(model, args, run, ranks, steps)
        measured = train(cfg, run, ranks)
        result["stages"][stage] = {"ranks": ranks, "layout": cfg["parallel"], **measured}
    elements = sorted(json.loads((data / "manifest.json").read_text())["elements"], key=int)
    pruned = run / "export" / "pruned.safetensors"
    pruned.parent.mkdir(parents=True, exist_ok=True)
    export = [sys.executable, "-m", "janus.export", "--checkpoint", str(run / "train" / "checkpoints")]
    result["stages"]["export"] = run_measured(
        [*export, "--out", str(pruned), "--keep-elements", ",".join(elements)]
    )
    evaluate = [
        sys.executable, "-m", "evaluation.evaluate", "--model", str(pruned), "--data", str(data),
        "--out", str(run / "eval"), "--max-per-task", "4", "--md-steps", "5", "--fd-structures", "1",
        "--no-plots",
    ]  # fmt: skip
    result["stages"]["evaluate"] = run_measured(evaluate)
    result["steps"] = steps_of(run)
    from janus.export import describe

    shown = describe(pruned)
    result["export"] = {
        "bytes": shown["bytes"],
        "num_experts": shown["num_experts"],
        "pruned_from_experts": shown["provenance"].get("pruned_from_experts"),
    }
    result["eval"] = json.loads((run / "eval" / "metrics.json").read_text())["tasks"]
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(result: dict[str, Any]) -> str:
    stages = result["stages"]
    lines = [
        f"model {result['model']['preset']} {result['model']['overrides'] or ''}: "
        f"{result['parameters'] / 1e9:.3f} B parameters",
        "",
        f"{'stage':<9} {'ranks':>5} {'layout dp,graph,expert':>22} {'wall s':>8}  peak RSS per process (GiB)",
    ]
    for name, stage in stages.items():
        shape = ",".join(str(v) for v in stage["layout"].values()) if "layout" in stage else "-"
        peaks = " ".join(f"{k}={gib(v)}" for k, v in stage["peak_rss_bytes"].items())
        lines.append(f"{name:<9} {stage.get('ranks', 1):>5} {shape:>22} {stage['wall_s']:>8.1f}  {peaks}")
    lines += ["", f"{'step':>4} {'ranks':>5} {'s/step':>8} {'loss':>12} {'peak RSS max over ranks GiB':>28}"]
    for r in result["steps"]:
        lines.append(
            f"{r['step']:>4} {r['world_size']:>5} {r['step_time_s']:>8.1f} {r['loss']:>12.4f} "
            f"{gib(r['peak_memory_bytes_max']):>28}"
        )
    export = result["export"]
    lines += [
        "",
        f"export: {export['num_experts']} of {export['pruned_from_experts']} experts kept, "
        f"{export['bytes'] / 2**20:.0f} MiB",
    ]
    for task, scores in result["eval"].items():
        lines.append(
            f"eval {task}: energy MAE {scores['energy_mae_mev_per_atom']:.1f} meV/atom, "
            f"force MAE {scores['force_mae_mev_per_a']:.1f} meV/Å on {scores['n_structures']} held-out "
            "structures"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="moe-s")
    parser.add_argument("--blocks", type=int, help="interaction blocks, all MoE (default: the preset's)")
    parser.add_argument("--experts", type=int, help="experts per MoE layer (default: the preset's)")
    parser.add_argument("--top-k", type=int, help="experts per element (default: the preset's)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--resume-ranks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resume-steps", type=int, default=1)
    parser.add_argument("--max-atoms", type=int, default=8, help="train.max_atoms_per_batch")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_moe_train")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = bench(args)
    for stage in result["stages"].values():
        stage.pop("log")
    print(report(result))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
