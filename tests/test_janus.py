"""janus: launchers, layouts, and every parallel layout against one process on real gloo process groups.

Each multi-process test trains the tiny model for three optimizer steps (float64, gradient clipping
active, EMA on) on a layout of the (dp, graph, expert) mesh and compares with the same run on one
process: losses, per-structure energies, forces and stresses as the distributed forward computed them,
and the parameters and EMA after the last step. Processes are started with `torch.multiprocessing`;
the command-line tests start `python -m janus.train` itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from janus import launch
from janus.batching import Coordinates, assign, choose_partitioned, partition
from janus.config import JanusConfig
from janus.flops import STEP_OVER_FORWARD, FlopMeter, count_triplets
from janus.planner import expert_counts, plan
from matris.config import LossConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
TOL = 1e-9  # float64 runs: layouts differ only in summation order
SMALL_MODEL = {"dim": 16, "num_heads": 2, "expert_hidden": 16}  # for the 500-atom cell


# -- data and process helpers ----------------------------------------------------------------------------


def prepare(inputs: list[Path], out: Path) -> Path:
    cmd = [sys.executable, "-m", "data_prep", *map(str, inputs), "--out", str(out), "--val-fraction", "0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=300)
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Crystals and molecules of 2–48 atoms."""
    out = tmp_path_factory.mktemp("small") / "data"
    return prepare([SAMPLE / "crystals_pbe.extxyz.gz", SAMPLE / "molecules_gfn2.extxyz.gz"], out)


@pytest.fixture(scope="module")
def alloy_data(tmp_path_factory) -> Path:
    """The 500-atom periodic alloy cell of the bundled sample (35,120 edges at 6 Å)."""
    import ase.io

    folder = tmp_path_factory.mktemp("alloy")
    frames = ase.io.read(SAMPLE / "alloys_emt.extxyz.gz", index=":")
    ase.io.write(folder / "alloy500.extxyz", next(f for f in frames if len(f) == 500))
    return prepare([folder / "alloy500.extxyz"], folder / "data")


def config(data: Path, out: Path, layout: tuple[int, int, int], **train: Any) -> dict[str, Any]:
    model = train.pop("model", {})
    return {
        "model": {"preset": "tiny", "overrides": model},
        "parallel": dict(zip(("dp", "graph", "expert"), layout, strict=True)),
        "train": {
            "steps": 10,
            "warmup_steps": 1,
            "max_atoms_per_batch": 64,
            "dtype": "float64",
            "grad_clip": 1.0,  # below the gradient norms here, so clipping is always active
            "ema_decay": 0.9,
            "peak_tflops": 1.0,
            **train,
        },
        "data_dir": str(data),
        "out_dir": str(out),
    }


def _worker(rank: int, world: int, store: str, cfg: dict, steps: int, save_at: int | None, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from janus.parallel import full_tensor
    from janus.train import Trainer

    env = launch.DistEnv(rank, world, rank, "127.0.0.1", 0, "test")
    # a file rendezvous: no port to race for with other processes on the machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        trainer = Trainer(JanusConfig.model_validate(cfg), env)
        start = trainer.resume()
        records, predictions = [], {}
        for step in range(start, steps):
            result = trainer.step(step)
            records.append(result.record)
            predictions.update({(step, i): p for i, p in result.predictions.items()})
            if save_at == step + 1:
                trainer.save(step + 1, result.record["epoch"])
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, predictions)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = get_model_state_dict(trainer.model, options=options)
        ema = {k: full_tensor(v).cpu() for k, v in trainer.ema.state_dict().items()} if trainer.ema else {}
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            torch.save({"records": records, "preds": merged, "params": params, "ema": ema}, out)
        dist.barrier()  # as janus.train.main: leave no collective in flight at teardown
    finally:
        dist.destroy_process_group()


def run_layout(cfg: dict, steps: int, out: Path, save_at: int | None = None) -> dict[str, Any]:
    world = cfg["parallel"]["dp"] * cfg["parallel"]["graph"] * cfg["parallel"]["expert"]
    store = out.with_name(out.name + ".store")
    store.unlink(missing_ok=True)
    mp.spawn(_worker, args=(world, str(store), cfg, steps, save_at, str(out)), nprocs=world)
    return torch.load(out, weights_only=False)


_REFERENCES: dict[str, dict[str, Any]] = {}


def reference(data: Path, tmp_path: Path, run_steps: int = 3, **train: Any) -> dict[str, Any]:
    """The single-process run of a configuration with plain ops (cached per module)."""
    key = json.dumps([str(data), run_steps, train], sort_keys=True)
    if key not in _REFERENCES:
        cfg = config(data, tmp_path / "reference", (1, 1, 1), **train)
        with mock.patch.dict(os.environ, {"MATRIS_COMPILE": "0"}):
            _REFERENCES[key] = run_layout(cfg, run_steps, tmp_path / "reference.pt")
    return _REFERENCES[key]


def assert_same_training(
    ref: dict[str, Any], got: dict[str, Any], tol: float = TOL, state: bool = True
) -> None:
    """Same losses, predictions and (with ``state``) parameters and EMA; ``ref`` may run longer."""
    ref = {**ref, "records": ref["records"][: len(got["records"])]}
    ref["preds"] = {k: v for k, v in ref["preds"].items() if k[0] < len(got["records"])}
    assert [r["step"] for r in got["records"]] == [r["step"] for r in ref["records"]]
    for a, b in zip(ref["records"], got["records"], strict=True):
        for key in ("loss", "grad_norm", "aux", "atoms", "edges"):
            assert b[key] == pytest.approx(a[key], rel=tol, abs=tol), (a["step"], key)
    assert set(got["preds"]) == set(ref["preds"]) and got["preds"]
    for key, pred in ref["preds"].items():
        for name in ("energy", "forces", "stress"):
            np.testing.assert_allclose(got["preds"][key][name], pred[name], rtol=tol, atol=tol, err_msg=name)
    for group in ("params", "ema") if state else ():
        assert set(got[group]) == set(ref[group])
        for name, value in ref[group].items():
            torch.testing.assert_close(got[group][name], value, rtol=tol, atol=tol, msg=f"{group} {name}")


# -- launch and layout -----------------------------------------------------------------------------------


def test_detect_launchers(tmp_path):
    env = launch.detect(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3, 8, 1, "10.0.0.1", 1234,
    )  # fmt: skip
    assert env.launcher == "torchrun" and not env.is_main

    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1",
             "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}  # fmt: skip
    env = launch.detect(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        5,
        16,
        1,
        "n1",
        "slurm",
    )
    assert 20000 <= env.master_port < 40000
    assert launch.detect(slurm).master_port == env.master_port  # every rank derives the same port
    env = launch.detect({k: v for k, v in slurm.items() if k != "MASTER_ADDR"})  # no node list: loopback
    assert env.master_addr == "127.0.0.1"

    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1000c0s0b0n0\nx1000c0s0b0n1\n")
    pals = {"PALS_RANKID": "13", "PALS_LOCAL_RANKID": "1", "PMI_SIZE": "24", "PBS_NODEFILE": str(nodefile),
            "PBS_JOBID": "123.aurora"}  # fmt: skip
    env = launch.detect(pals)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        13, 24, 1, "x1000c0s0b0n0", "pals",
    )  # fmt: skip

    env = launch.detect({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single") and env.is_main
    assert launch.backend_for_device() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_layout_errors(small_data, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps(config(small_data, tmp_path / "out", (2, 1, 1))))
    result = subprocess.run(
        [sys.executable, "-m", "janus.train", "--config", str(cfg_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "parallel.dp × parallel.graph × parallel.expert = 2 × 1 × 1 = 2, but 1 ranks" in result.stderr

    with pytest.raises(ValueError, match="does not divide the model's 4 experts"):
        JanusConfig.model_validate(config(small_data, tmp_path, (1, 1, 3)))
    wrong = config(small_data, tmp_path, (1, 1, 2))
    wrong["model"]["preset"] = "matris-6l"
    with pytest.raises(ValueError, match="has no MoE layers"):
        JanusConfig.model_validate(wrong)


# -- the pieces on their own -----------------------------------------------------------------------------


def test_planner_balances_tokens_and_agrees_on_routes():
    rng = np.random.default_rng(0)
    ranks, experts, num_z, top_k = 8, 16, 30, 4
    histograms = rng.integers(0, 40, (ranks, num_z)) * (rng.random((ranks, num_z)) < 0.3)
    histograms[:, 5] += 200  # one dominant element: its experts must be split over ranks
    table = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(num_z)])
    counts = expert_counts(histograms, table, experts)
    assert (counts.sum(1) == histograms.sum(1) * top_k).all()
    p = plan(counts)
    load = p.rank_load
    assert load.sum() == counts.sum() and load.max() - load.min() <= 1
    assert p.imbalance < 1.01 < p.static_imbalance()
    assert set(p.piece_expert.tolist()) == set(np.flatnonzero(counts.sum(0)).tolist())  # only active ones
    for source in range(ranks):  # what each source sends is what each destination expects from it
        sent = p.send_counts(source)
        assert (sent.sum(0) == counts[source]).all()
        for dest in range(ranks):
            assert (p.recv_counts(dest)[source] == sent[dest, p.experts_on(dest)]).all()
    e = np.repeat(np.arange(experts), counts.sum(0))
    position = np.concatenate([np.arange(n) for n in counts.sum(0)])
    assert (np.bincount(p.destination(e, position), minlength=ranks) == load).all()


def test_partition_balances_edges_across_periodic_boundaries(alloy_data):
    from data_prep.loader import GraphDataset

    graph = GraphDataset(alloy_data)[0]
    centre, neighbour = graph.edge_index
    for parts in (2, 3, 4):
        part = partition(graph, parts)
        edges = np.bincount(part[centre], minlength=parts)
        assert edges.max() / edges.mean() < 1.02, edges
        crossing = part[centre] != part[neighbour]
        wrapped = (graph.edge_shift != 0).any(1)
        assert crossing.any() and (crossing & wrapped).any()  # parts meet across the periodic boundary
    sizes = np.array([[500, 35120], [8, 300], [8, 300], [2, 2]])
    assert choose_partitioned([0, 1, 2, 3], sizes, 2) == ([0], [1, 2, 3])  # heavier than its share
    assert choose_partitioned([1, 3], sizes, 2) == ([1, 3], [])  # two ranks, one real structure
    work = [assign([0, 1, 2, 3], sizes, Coordinates(0, g, 0, 1, 2, 1)) for g in range(2)]
    assert [w.partitioned for w in work] == [[0], [0]]
    assert sorted(work[0].whole + work[1].whole) == [1, 2, 3]
    assert work[0].loss_structures == [*work[0].whole, 0] and work[1].loss_structures == work[1].whole


def test_flop_meter_counts_and_calibrates(small_data):
    from data_prep.loader import GraphDataset
    from matris import MatRIS, ModelConfig
    from matris.batch import collate
    from matris.flops import model_flops

    dataset = GraphDataset(small_data)
    config_ = ModelConfig.from_preset("tiny", tasks=dataset.tasks)
    torch.manual_seed(0)
    model = MatRIS(config_)
    graphs = [dataset[i] for i in range(6)]
    batch = collate(graphs)
    shape = (batch.num_atoms, batch.num_edges, sum(count_triplets(g, 4.0) for g in graphs), len(graphs))
    meter = FlopMeter(config_, every=10)
    assert [meter.counts(s) for s in (0, 1, 2, 9, 10)] == [True, True, False, False, True]
    with meter.counting(0):
        counted = model_flops(model, batch)
    assert meter.measured() == counted["total"] > 0
    meter.calibrate(counted["total"], *shape)
    assert meter.estimate(*shape) == pytest.approx(counted["total"])
    with meter.counting(2):
        pass
    assert meter.measured() is None
    # the analytic shape: a training step is about six forwards, and the ratio stays near 1
    assert counted["total"] / counted["forward"] == pytest.approx(STEP_OVER_FORWARD, rel=0.1)
    assert 0.2 < meter.ratio < 5


# -- layouts against one process -------------------------------------------------------------------------


def test_reference_gradients_are_a_plain_full_backward(small_data, tmp_path):
    """The one-process trainer (FSDP on one rank, the backward stopped at the parameters) computes the
    gradient norm of a plain model's ``loss.backward()``: what every layout below is compared against."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from janus.train import Trainer
    from matris import MatRIS, multitask_loss, predict
    from matris.batch import collate

    cfg = JanusConfig.model_validate(config(small_data, tmp_path / "run", (1, 1, 1)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with mock.patch.dict(os.environ, {"MATRIS_COMPILE": "0"}):
            trainer = Trainer(cfg, launch.DistEnv(0, 1, 0, "127.0.0.1", 0, "test"))
            plain = MatRIS(trainer.model_cfg).to(torch.float64)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            plain.load_state_dict(get_model_state_dict(trainer.model, options=options))
            _, indices = trainer.global_batch(0)
            batch = collate([trainer.dataset[i] for i in indices], dtype=torch.float64)
            pred = predict(plain, batch, training=True)
            loss, _ = multitask_loss(pred, batch, trainer.model_cfg.tasks, cfg.loss)
            loss.backward()
            grads = [p.grad for p in plain.parameters() if p.grad is not None]
            record = trainer.step(0).record
    finally:
        dist.destroy_process_group()
    assert len(grads) == sum(1 for p in plain.parameters() if p.requires_grad)
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-12)
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-10)


@pytest.mark.parametrize("dp", [pytest.param(2, marks=pytest.mark.compiled), 4])
def test_fsdp_matches_single_process(small_data, tmp_path, dp):
    """FSDP on 2 and 4 ranks; on 2 with `matris.fused`'s compiled kernels, against plain ops on one."""
    got = run_layout(config(small_data, tmp_path / "run", (dp, 1, 1)), 3, tmp_path / "got.pt")
    assert_same_training(reference(small_data, tmp_path), got)
    record = got["records"][-1]
    assert record["world_size"] == dp and record["layout"] == [dp, 1, 1]
    for key in ("atoms_per_s", "flops", "flop_efficiency", "peak_memory_bytes", "expert_imbalance"):
        assert record[key] > 0, key


def test_expert_parallel_matches_single_process(small_data, tmp_path):
    got = run_layout(config(small_data, tmp_path / "run", (1, 1, 2)), 3, tmp_path / "got.pt")
    assert_same_training(reference(small_data, tmp_path), got)
    for record in got["records"]:  # the planner balances what static placement would not
        assert record["expert_imbalance"] < 1.01 <= record["expert_imbalance_static"]


def test_graph_parallel_large_cell_matches_single_process(alloy_data, tmp_path):
    """The 500-atom cell cut in two: energy, forces, stress and parameter updates as on one process."""
    ref = reference(alloy_data, tmp_path, model=SMALL_MODEL)
    got = run_layout(config(alloy_data, tmp_path / "run", (1, 2, 1), model=SMALL_MODEL), 3, tmp_path / "g.pt")
    assert [key[1] for key in got["preds"]] == [0, 0, 0]
    assert_same_training(ref, got)


@pytest.mark.parametrize("layout", [(1, 2, 2), (2, 2, 1)])
def test_combined_layouts_match_single_process(small_data, tmp_path, layout):
    """Two of the three dims at a time on four processes (2 × 1 × 2 runs in the checkpoint test); small
    structures are partitioned whenever a graph group holds fewer heavy structures than ranks, so pieces,
    whole structures, expert dispatch and FSDP all meet in one step."""
    got = run_layout(config(small_data, tmp_path / "run", layout), 3, tmp_path / "got.pt")
    assert_same_training(reference(small_data, tmp_path), got)


@pytest.mark.slow
def test_all_three_dims_match_single_process(small_data, tmp_path):
    got = run_layout(config(small_data, tmp_path / "run", (2, 2, 2)), 3, tmp_path / "got.pt")
    assert_same_training(reference(small_data, tmp_path), got)


# -- checkpoints -----------------------------------------------------------------------------------------


def test_checkpoint_from_four_ranks_resumes_on_two(small_data, tmp_path):
    """Trained and saved with experts sharded over 2 ranks and FSDP over 2 (4 ranks, 2-D expert shards),
    resumed on 2 plain FSDP ranks: both match one process, and export consolidates the expert shards."""
    from janus.export import consolidate

    ref = reference(small_data, tmp_path)
    out = tmp_path / "run"
    first = run_layout(config(small_data, out, (2, 1, 2)), 2, tmp_path / "first.pt", save_at=2)
    assert_same_training(ref, first, state=False)
    saved = out / "checkpoints" / "step_000000002"
    assert json.loads((saved / "train_state.json").read_text())["world_size"] == 4
    resumed = run_layout(config(small_data, out, (2, 1, 1)), 3, tmp_path / "second.pt")
    assert [r["step"] for r in resumed["records"]] == [3]
    assert resumed["records"][0]["loss"] == pytest.approx(ref["records"][2]["loss"], rel=TOL)
    for group in ("params", "ema"):
        for name, value in resumed[group].items():
            torch.testing.assert_close(value, ref[group][name], rtol=TOL, atol=TOL)

    model = consolidate(saved)
    experts = model.blocks[0].message.experts.w1
    assert experts.shape[0] == model.config.num_experts
    assert set(model.state_dict()) == set(ref["params"]) | {"reference_energy"}


def test_sigkill_resumes_from_last_checkpoint(small_data, tmp_path):
    """`python -m janus.train` killed by SIGKILL after its step-2 checkpoint, then rerun: one metrics
    line per step, and the steps after the checkpoint repeat the uninterrupted run's losses."""
    steps = 5
    cfg = config(
        small_data, tmp_path / "run", (1, 1, 1), steps=steps, checkpoint_every=2, sleep_per_step_s=1.0
    )
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "janus.train", "--config", str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = tmp_path / "run" / "checkpoints" / "step_000000002" / "train_state.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from" in rerun.stdout and "step_000000002" in rerun.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    ref = reference(small_data, tmp_path, run_steps=steps, steps=steps)
    for got, want in zip(lines, ref["records"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_000000004",
        "step_000000005",
    ]


def test_time_budget_stops_training_decays_the_schedule_and_completes_the_stage(small_data, tmp_path):
    """`train.time_budget_s` ends a run long before `train.steps`, with the learning rate decayed over the
    seconds, a final checkpoint that the workflow counts as complete, and a rerun that trains no more."""
    from workflows.stages import train_complete

    cfg = config(
        small_data, tmp_path / "run", (1, 1, 1), steps=1000, warmup_steps=1, min_lr_ratio=0.1,
        checkpoint_every=1000, sleep_per_step_s=0.5, time_budget_s=3.0,
    )  # fmt: skip
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "janus.train", "--config", str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "time budget of 3 s spent" in first.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 2 <= len(lines) < 20
    assert lines[-1]["elapsed_s"] >= 3.0
    lrs = [r["lr"] for r in lines]
    assert lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] < 0.5 * max(lrs)
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in saved] == [f"step_{len(lines):09d}"]
    assert train_complete(tmp_path / "run", 1000)

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "was spent by step" in rerun.stdout, rerun.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(lines)


def test_final_loss_stage_switches_weights_part_way(small_data, tmp_path):
    """`loss.final` replaces the loss weights once its fraction of the run is done, on every rank alike."""
    cfg = config(small_data, tmp_path / "run", (2, 1, 1), steps=4)
    cfg["loss"] = {"final": {"start": 0.5, "energy": 0.0, "force": 0.0, "stress": 0.0}}
    records = run_layout(cfg, 4, tmp_path / "final.pt")["records"]
    for record in records[:2]:
        assert record["loss"] > 10 * LossConfig().aux * record["aux"]
    for record in records[2:]:
        assert record["loss"] == pytest.approx(LossConfig().aux * record["aux"], rel=1e-9)


GOLDEN = Path(__file__).parent / "golden" / "training_losses.json"


def test_training_losses_match_the_recorded_run(small_data, tmp_path):
    """The same model, data and seed give the same losses as the run recorded in ``GOLDEN``: a refactor
    must not change what is trained. A deliberate change of the training math rewrites the file, with
    ``MATRIS_UPDATE_GOLDEN=1``, in the same commit."""
    ref = reference(small_data, tmp_path)
    got = [{k: r[k] for k in ("step", "loss", "grad_norm", "aux", "atoms")} for r in ref["records"]]
    if os.environ.get("MATRIS_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "grad_norm", "aux", "atoms"):
            assert b[key] == pytest.approx(a[key], rel=1e-8), (a["step"], key)


def test_ghost_refresh_hooks_find_their_argument_by_name():
    """The graph-sharding hooks refresh the argument they name, passed by position or by keyword and
    whatever the order of the module's parameters; a module without that argument is refused at install."""
    from torch import nn

    from janus.graph_parallel import _refresh_before
    from janus.parallel import StepContext

    class Marks:  # a halo whose refresh is visible: ghost rows (after the first) become -1
        def refresh(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:1], -torch.ones_like(x[1:])])

    class Reordered(nn.Module):
        def forward(self, bond, source, query):
            return bond, source, query

    ctx = StepContext()
    module = Reordered()
    _refresh_before(module, "source", ctx)
    x = [torch.arange(3.0) + 10 * i for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(module(*x), x, strict=True)), "no halo: nothing refreshed"
    ctx.halo = Marks()
    for out in (module(*x), module(x[0], query=x[2], source=x[1])):
        assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
        assert out[1].tolist() == [10.0, -1.0, -1.0]
    with pytest.raises(TypeError, match=r"Reordered\.forward has no argument 'atoms'"):
        _refresh_before(module, "atoms", ctx)
