"""Per-rank training entry point: `python -m janus.train --config FILE [--set key=value ...]`.

Works under torchrun, srun, mpiexec/PALS and as a plain process (see `janus.launch`). The global batch of
a step depends only on the data, the seed and the batch budget; data-parallel ranks split it, and the loss
reduces its statistics across them, so every layout trains the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.loader import BatchPlan, GraphDataset, split_for_ranks
from janus import checkpoint, launch
from janus.config import JanusConfig
from janus.metrics import MetricsLog, peak_memory_bytes
from janus.overrides import ConfigError, build, load_yaml
from janus.parallel import LayoutError, apply_fsdp, build_mesh, force_phase, full_tensor
from matris import MatRIS, ModelConfig, predict
from matris.batch import collate
from matris.loss import multitask_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def lr_lambda(cfg: JanusConfig):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    train = cfg.train

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine

    return factor


def peak_lr(cfg: JanusConfig) -> float:
    """Square-root scaling of the learning rate with the global batch (Adam's rule of thumb)."""
    return cfg.train.lr * math.sqrt(cfg.train.max_atoms_per_batch / cfg.train.lr_reference_atoms)


def resolve_model_config(cfg: JanusConfig, manifest: dict) -> ModelConfig:
    model_cfg = ModelConfig.from_preset(
        cfg.model.preset, tasks=list(manifest["tasks"]), **cfg.model.overrides
    )
    if model_cfg.cutoff > manifest["cutoff"] + 1e-9:
        raise ConfigError(
            f"model cutoff {model_cfg.cutoff} Å exceeds the data's graph cutoff {manifest['cutoff']} Å "
            f"({cfg.data_dir / 'manifest.json'}); rebuild the data with a larger cutoff"
        )
    return model_cfg


def check_layout(cfg: JanusConfig) -> None:
    if cfg.parallel.graph > 1 or cfg.parallel.expert > 1:
        raise LayoutError(
            "graph sharding (parallel.graph > 1) and expert sharding (parallel.expert > 1) are not "
            "available in this release; use parallel.dp only"
        )


def train(cfg: JanusConfig, env: launch.DistEnv) -> None:
    device = launch.device_for(env)
    dtype = DTYPES[cfg.train.dtype]
    check_layout(cfg)
    mesh = build_mesh(cfg.parallel, env.world_size, device.type)
    dp_group = mesh["dp"].get_group()
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()

    manifest = json.loads((cfg.data_dir / "manifest.json").read_text())
    model_cfg = resolve_model_config(cfg, manifest)
    torch.manual_seed(cfg.train.seed)
    model = MatRIS(model_cfg).to(device=device, dtype=dtype)
    model.set_reference_energies(manifest["reference_energies"])
    apply_fsdp(model, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr(cfg), weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    ckpt_root = cfg.out_dir / "checkpoints"
    start = 0
    previous = checkpoint.latest(ckpt_root)
    if previous is not None:
        state = checkpoint.load(previous, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        if env.is_main:
            print(f"janus: resumed from {previous} at step {start}", flush=True)
    log = MetricsLog(cfg.out_dir / "metrics.jsonl", resume_step=start) if env.is_main else None

    dataset = GraphDataset(cfg.data_dir, split="train")
    plan = BatchPlan(
        dataset.sizes,
        max_atoms=cfg.train.max_atoms_per_batch,
        max_edges=cfg.train.max_edges_per_batch,
        seed=cfg.train.seed,
    )

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        """Sum batch statistics over data-parallel ranks (they carry no gradient)."""
        dist.all_reduce(tensor, group=dp_group)
        return tensor

    epoch_batches: tuple[int, list[list[int]]] = (-1, [])
    for step in range(start, cfg.train.steps):
        tic = time.perf_counter()
        epoch, index = plan.locate(step)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, plan.batches(epoch))
        global_batch = epoch_batches[1][index]
        mine = split_for_ranks(global_batch, dataset.sizes, dp_size)[dp_rank]
        # A rank left without a structure still joins every collective, on a stand-in that adds nothing.
        active = bool(mine)
        batch = collate([dataset[i] for i in (mine or global_batch[:1])], dtype=dtype).to(device)

        with force_phase(model):
            pred = predict(model, batch, training=True)
            loss, parts = multitask_loss(
                pred, batch, model_cfg.tasks, cfg.loss, all_reduce=all_reduce_sum, active=active
            )
        loss.backward()
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.train.sleep_per_step_s:
            time.sleep(cfg.train.sleep_per_step_s)

        totals = torch.tensor([batch.num_atoms, batch.num_edges], dtype=torch.float64) * active
        dist.all_reduce(totals)
        elapsed = time.perf_counter() - tic
        done = step + 1
        if log is not None:
            log.write(
                {
                    "step": done,
                    "epoch": epoch,
                    **parts,
                    "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0],
                    "atoms": int(totals[0]),
                    "edges": int(totals[1]),
                    "step_time_s": elapsed,
                    "atoms_per_s": totals[0].item() / elapsed,
                    "peak_memory_bytes": peak_memory_bytes(device),
                    "world_size": env.world_size,
                }
            )
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            checkpoint.save(
                ckpt_root,
                done,
                model,
                optimizer,
                {"scheduler": scheduler.state_dict(), "epoch": epoch, "seed": cfg.train.seed},
                model_cfg.model_dump(mode="json"),
                keep=cfg.train.keep_checkpoints,
            )
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
        check_layout(cfg)
    except (ConfigError, LayoutError) as err:
        print(f"janus.train: {err}", file=sys.stderr)
        return 2
    env = launch.detect()
    launch.init_process_group(env)
    (cfg.out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "ranks" / f"rank{env.rank}.pid").write_text(str(os.getpid()))
    try:
        train(cfg, env)
    except (ConfigError, LayoutError) as err:
        print(f"janus.train: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
