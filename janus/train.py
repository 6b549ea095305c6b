"""Per-rank training entry point: `python -m janus.train --config FILE [--set key=value ...]`.

Works under torchrun, srun, mpiexec/PALS and as a plain process (see `janus.launch`). The global batch of
a step depends only on the data, the seed and the batch budget; the ranks of the (dp, graph, expert) mesh
split it (`janus.batching`), and the loss reduces its statistics across all of them, so every layout
trains the same model.

One step: the planner's element histograms are gathered over the expert group; the forward, the force
and stress backward (``create_graph=True``) and the loss backward run with parameters gathered and
gradients local (`janus.parallel.step_phase`), partitioned structures through `janus.graph_parallel`;
expert-weight gradients then go back to the ranks storing them, FSDP reduce-scatters every group once
(`janus.parallel.reduce_gradients`), and the gradients are clipped by their global norm before AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_prep.loader import BatchPlan, GraphDataset
from janus import checkpoint, launch
from janus.batching import Coordinates, RankWork, assign, loss_batch, partition
from janus.config import JanusConfig, LayoutError, TrainConfig, check_layout
from janus.ema import EMA
from janus.expert_parallel import gathered_weights, return_gradients
from janus.flops import FlopMeter, count_triplets, peak_flops
from janus.graph_parallel import build_step, predict_sharded
from janus.metrics import MetricsLog, peak_memory_bytes
from janus.overrides import ConfigError, build, load_yaml
from janus.parallel import (
    StepContext,
    build_mesh,
    clip_grad_norm_,
    reduce_gradients,
    step_phase,
)
from janus.parallelize import parallelize
from janus.validation import Validator, describe
from matris import MatRIS, ModelConfig, predict
from matris.batch import collate
from matris.graph import StructureGraph
from matris.loss import multitask_loss
from matris.moe import deferred_experts
from matris.properties import parameter_backward

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TrainingClock:
    """Seconds spent training, the slowest rank's, carried across resumes: ``train.time_budget_s``.

    ``agreed`` is updated from the per-step MAX reduction every rank already does, so every rank sees the
    same value and makes the same schedule and stopping decisions.
    """

    def __init__(self, budget_s: float | None):
        self.budget_s = budget_s
        self.before = self.agreed = 0.0
        self.started = time.perf_counter()

    def resume(self, elapsed_before: float) -> None:
        self.before = self.agreed = elapsed_before

    def start(self) -> None:
        self.started = time.perf_counter()

    def local(self) -> float:
        return self.before + time.perf_counter() - self.started

    def progress(self) -> float:
        return self.agreed / self.budget_s if self.budget_s else 0.0

    @property
    def expired(self) -> bool:
        return self.budget_s is not None and self.agreed >= self.budget_s


def lr_lambda(cfg: JanusConfig, clock: TrainingClock | None = None):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak over the steps or, if it ends
    sooner, the time budget."""
    train = cfg.train

    def factor(step: int) -> float:
        warmup = train.warmup
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = run_progress(train, step, clock, warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


def run_progress(train: TrainConfig, step: int, clock: TrainingClock | None, skip: int = 0) -> float:
    """How much of the run (0 → 1) is done after ``skip`` steps: of the steps or, if it ends sooner, the
    time budget."""
    progress = (step - skip) / max(1, train.steps - skip)
    return min(1.0, max(progress, clock.progress() if clock is not None else 0.0))


def peak_lr(cfg: JanusConfig) -> float:
    """Square-root scaling of the learning rate with the global batch (Adam's rule of thumb)."""
    return cfg.train.lr * math.sqrt(cfg.train.max_atoms_per_batch / cfg.train.lr_reference_atoms)


def resolve_model_config(cfg: JanusConfig, manifest: dict) -> ModelConfig:
    model_cfg = cfg.model.resolve(list(manifest["tasks"]))
    if model_cfg.cutoff > manifest["cutoff"] + 1e-9:
        raise ConfigError(
            f"model cutoff {model_cfg.cutoff} Å exceeds the data's graph cutoff {manifest['cutoff']} Å "
            f"({cfg.data_dir / 'manifest.json'}); rebuild the data with a larger cutoff"
        )
    return model_cfg


@dataclass
class StepResult:
    """What one optimizer step reports: the metrics line and this rank's loss-structure predictions."""

    record: dict[str, Any]
    predictions: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)


class Trainer:
    """The model, its sharding, optimizer, schedule, data plan and checkpoints of one rank."""

    def __init__(self, cfg: JanusConfig, env: launch.DistEnv):
        self.cfg, self.env = cfg, env
        self.device = launch.device_for(env)
        self.dtype = DTYPES[cfg.train.dtype]
        manifest = json.loads((cfg.data_dir / "manifest.json").read_text())
        self.model_cfg = resolve_model_config(cfg, manifest)
        check_layout(cfg.parallel, self.model_cfg)
        self.meshes = build_mesh(cfg.parallel, env.world_size, self.device.type)
        m = self.meshes
        self.where = Coordinates(
            m.rank("dp"), m.rank("graph"), m.rank("expert"), m.size("dp"), m.size("graph"), m.size("expert")
        )

        torch.manual_seed(cfg.train.seed)
        with deferred_experts():  # each rank allocates only the experts it stores (`parallelize`)
            model = MatRIS(self.model_cfg).to(dtype=self.dtype)
        model.set_reference_energies(manifest["reference_energies"])
        self.ctx = StepContext()
        self.model = parallelize(model, cfg, m, self.ctx, self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=peak_lr(cfg), weight_decay=cfg.train.weight_decay
        )
        self.clock = TrainingClock(cfg.train.time_budget_s)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.clock))
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None

        self.dataset = GraphDataset(cfg.data_dir, split="train", cutoff=self.model_cfg.cutoff)
        self.plan = BatchPlan(
            self.dataset.sizes,
            max_atoms=cfg.train.max_atoms_per_batch,
            max_edges=cfg.train.max_edges_per_batch,
            seed=cfg.train.seed,
            max_triplets=cfg.train.max_triplets_per_batch,
        )
        self.ckpt_root = cfg.out_dir / "checkpoints"
        self.start = 0
        self._triplets: dict[int, int] = {}
        self._parts: dict[int, np.ndarray] = {}
        self.flops = FlopMeter(self.model_cfg)
        self._peak = (
            cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops else peak_flops(self.device, self.dtype)
        )

    # -- checkpoints -----------------------------------------------------------------------------------

    def _extra(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def resume(self) -> int:
        found = checkpoint.resume(self.ckpt_root, self.model, self.optimizer, self._extra())
        if found is not None:
            previous, state = found
            self.scheduler.load_state_dict(state["scheduler"])
            self.start = state["step"]
            self.clock.resume(state.get("elapsed_s", 0.0))
            if self.env.is_main:
                print(f"janus: resumed from {previous} at step {self.start}", flush=True)
        return self.start

    def save(self, step: int, epoch: int) -> Path:
        return checkpoint.save(
            self.ckpt_root,
            step,
            self.model,
            self.optimizer,
            {
                "scheduler": self.scheduler.state_dict(),
                "epoch": epoch,
                "elapsed_s": self.clock.local(),
                "time_budget_spent": self.clock.expired,
                "seed": self.cfg.train.seed,
                "parallel": self.cfg.parallel.model_dump(),
            },
            self.model_cfg.model_dump(mode="json"),
            keep=self.cfg.train.keep_checkpoints,
            extra=self._extra(),
        )

    # -- one step --------------------------------------------------------------------------------------

    def global_batch(self, step: int) -> tuple[int, list[int]]:
        epoch, index = self.plan.locate(step)
        return epoch, self.plan.batches(epoch)[index]

    def step(self, step: int) -> StepResult:
        tic = time.perf_counter()
        cfg, where = self.cfg, self.where
        epoch, global_batch = self.global_batch(step)
        work = assign(global_batch, self.dataset.sizes, where)
        graphs = {i: self.dataset[i] for i in work.whole + work.partitioned}
        parts = {i: self._partition(i, graphs[i]) for i in work.partitioned}
        loss_ids = work.loss_structures
        magmoms = self.model_cfg.magmom_head
        labels = loss_batch([graphs[i] for i in loss_ids], self.dtype, self.device, magmoms)
        loss_weights = cfg.loss.at(run_progress(cfg.train, step, self.clock))
        self.ctx.reset()
        if where.expert_size > 1:
            self.ctx.histograms = self._histograms(work, graphs, parts)

        with self.flops.counting(step), step_phase(self.model):
            if where.graph_size > 1:
                group = self.meshes.group("graph")
                num_z = self.model_cfg.max_z + 1
                graph_step = build_step(
                    graphs, work, parts, where.graph_size, group, num_z, self.dtype, self.device
                )
                pred = predict_sharded(self.model, graph_step, self.ctx, group, labels)
            else:
                batch = collate([graphs[i] for i in work.whole], dtype=self.dtype).to(self.device)
                pred = predict(self.model, batch, training=True)
            loss, parts_metrics = multitask_loss(
                pred, labels, self.model_cfg.tasks, loss_weights, self._sum_over_ranks, active=work.active
            )
            parameter_backward(loss, self.model, gathered_weights(self.ctx))
        return_gradients(self.ctx)
        reduce_gradients(self.model)
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        if cfg.train.sleep_per_step_s:
            time.sleep(cfg.train.sleep_per_step_s)

        record = self._record(step, epoch, global_batch, work, graphs, parts_metrics, grad_norm, tic)
        predictions = {}
        if work.active:
            predictions = _per_structure(pred, labels, loss_ids)
        return StepResult(record, predictions)

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum batch statistics over every rank (each holds distinct data); they carry no gradient."""
        dist.all_reduce(tensor)
        return tensor

    def _partition(self, index: int, graph: StructureGraph) -> np.ndarray:
        if index not in self._parts:
            self._parts[index] = partition(graph, self.where.graph_size)
        return self._parts[index]

    def _histograms(
        self, work: RankWork, graphs: dict[int, StructureGraph], parts: dict[int, np.ndarray]
    ) -> np.ndarray:
        """Element histograms of the atoms every rank of the expert group routes (its owned atoms)."""
        num_z = self.model_cfg.max_z + 1
        hist = np.zeros(num_z, dtype=np.int64)
        for i in work.whole:
            hist += np.bincount(graphs[i].atomic_numbers, minlength=num_z)[:num_z]
        for i in work.partitioned:
            owned = graphs[i].atomic_numbers[parts[i] == work.graph_rank]
            hist += np.bincount(owned, minlength=num_z)[:num_z]
        mine = torch.as_tensor(hist, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.where.expert_size)]
        dist.all_gather(gathered, mine, group=self.meshes.group("expert"))
        return torch.stack(gathered).cpu().numpy()

    def _record(
        self,
        step: int,
        epoch: int,
        global_batch: list[int],
        work: RankWork,
        graphs: dict[int, StructureGraph],
        parts_metrics: dict[str, float],
        grad_norm: torch.Tensor,
        tic: float,
    ) -> dict[str, Any]:
        sizes = self.dataset.sizes[global_batch]
        atoms, edges = int(sizes[:, 0].sum()), int(sizes[:, 1].sum())
        mine = work.loss_structures if work.active else []
        triplets = sum(self._count_triplets(i, graphs[i]) for i in mine)
        imbalance = max((p.imbalance for p in self.ctx.plans), default=1.0)
        static = max((p.static_imbalance() for p in self.ctx.plans), default=1.0)
        memory = peak_memory_bytes(self.device)
        counted = self.flops.measured()
        local = [float(triplets), (counted or 0.0) * work.active]
        summed = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        maxed = [float(memory), imbalance, static, self.clock.local()]
        maxed = torch.tensor(maxed, dtype=torch.float64, device=self.device)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        self.clock.agreed = float(maxed[3])
        elapsed = time.perf_counter() - tic
        shape = (atoms, edges, int(summed[0]), len(global_batch))
        if counted is not None:
            flops = float(summed[1])
            self.flops.calibrate(flops, *shape)
        else:
            flops = self.flops.estimate(*shape)
        record = {
            "step": step + 1,
            "epoch": epoch,
            **parts_metrics,
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "atoms": atoms,
            "edges": edges,
            "step_time_s": elapsed,
            "atoms_per_s": atoms / elapsed,
            "peak_memory_bytes": memory,
            "world_size": self.env.world_size,
            "torch_threads": torch.get_num_threads(),  # oversubscribed cores show here first
            "layout": [self.where.dp_size, self.where.graph_size, self.where.expert_size],
            "peak_memory_bytes_max": int(maxed[0]),
            "flops": flops,
            "tflops_per_s": flops / elapsed / 1e12,
            "flop_efficiency": flops / (elapsed * self.env.world_size * self._peak),
            "expert_imbalance": float(maxed[1]),
            "elapsed_s": self.clock.agreed,
        }
        if self.where.expert_size > 1:
            record["expert_imbalance_static"] = float(maxed[2])
        return record

    def _count_triplets(self, index: int, graph: StructureGraph) -> int:
        if index not in self._triplets:
            self._triplets[index] = count_triplets(graph, self.model_cfg.three_body_cutoff)
        return self._triplets[index]


def _per_structure(
    pred: dict[str, torch.Tensor], labels: Any, ids: list[int]
) -> dict[int, dict[str, np.ndarray]]:
    """Detached energy, forces and stress of each loss structure, keyed by dataset index."""
    n = labels.n_atoms.tolist()
    forces = pred["forces"].detach().cpu().split(n)
    return {
        i: {
            "energy": pred["energy"][k].detach().cpu().numpy(),
            "forces": forces[k].numpy(),
            "stress": pred["stress"][k].detach().cpu().numpy(),
        }
        for k, i in enumerate(ids)
    }


def train(cfg: JanusConfig, env: launch.DistEnv) -> None:
    trainer = Trainer(cfg, env)
    start = trainer.resume()
    if trainer.clock.expired:
        if env.is_main:
            print(f"janus: the time budget of {cfg.train.time_budget_s:g} s was spent by step {start}")
        return
    log = MetricsLog(cfg.out_dir / "metrics.jsonl", resume_step=start) if env.is_main else None
    every = cfg.train.eval_every
    validator = None
    if every:
        validator = Validator(
            cfg.data_dir, cfg.out_dir, trainer.model_cfg, cfg.loss, trainer.dtype, env.is_main,
            cfg.train.eval_max_structures, resumed=start > 0,
        )  # fmt: skip
    trainer.clock.start()
    for step in range(start, cfg.train.steps):
        result = trainer.step(step)
        done = step + 1
        last = done == cfg.train.steps or trainer.clock.expired
        if log is not None:
            log.write(result.record)
        if validator is not None and (done % every == 0 or last):
            records = validator.run(trainer.model, done, trainer.ema.state_dict() if trainer.ema else None)
            if log is not None and records:
                for record in records:
                    log.write(record)
                print(describe(records), flush=True)
        if done % cfg.train.checkpoint_every == 0 or last:
            trainer.save(done, result.record["epoch"])
        if trainer.clock.expired:
            if env.is_main:
                budget = cfg.train.time_budget_s
                print(f"janus: time budget of {budget:g} s spent after step {done}", flush=True)
            break
    if log is not None:
        log.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m janus.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML file of a janus.config.JanusConfig")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build(JanusConfig, load_yaml(args.config), args.set)
    except (ConfigError, LayoutError, ValueError) as err:
        print(f"janus.train: {err}", file=sys.stderr)
        return 2
    env = launch.detect()
    if cfg.parallel.world_size != env.world_size:
        print(
            f"janus.train: parallel.dp × parallel.graph × parallel.expert = {cfg.parallel.dp} × "
            f"{cfg.parallel.graph} × {cfg.parallel.expert} = {cfg.parallel.world_size}, but "
            f"{env.world_size} ranks were launched",
            file=sys.stderr,
        )
        return 2
    launch.init_process_group(env)
    (cfg.out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "ranks" / f"rank{env.rank}.pid").write_text(str(os.getpid()))
    try:
        train(cfg, env)
        dist.barrier()  # no rank tears the group down while another is still in a collective (gloo aborts)
    except (ConfigError, LayoutError, checkpoint.CheckpointError) as err:
        print(f"janus.train: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
