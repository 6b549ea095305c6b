"""Sharded checkpoints with torch.distributed.checkpoint, written atomically and kept K deep.

Layout of one checkpoint (a directory under ``train/checkpoints/``)::

    step_000050/
        *.distcp, .metadata     model and optimizer state (and the EMA, if on), sharded (DCP): reloads on
                                any world size and layout; ``model.*`` keys consolidate to the
                                single-device `matris.MatRIS` state dict (expert shards included)
        model_config.json       the resolved matris.ModelConfig, so export can rebuild the model alone
        train_state.json        step, scheduler, data position, RNG states; written last

All ranks write into ``step_000050.tmp/``; after a barrier rank 0 adds the JSON files and renames the
directory, so a directory without the ``.tmp`` suffix is always complete. A job killed mid-write leaves a
``.tmp`` directory that the next save or load removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step_(\d{9})$")
STATE_FILE = "train_state.json"
CONFIG_FILE = "model_config.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:09d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)), default=None)


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    model_config: dict[str, Any],
    keep: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final directory. ``extra`` holds further sharded
    states saved under their own prefix (e.g. ``{"ema": ...}``)."""
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    extra = extra or {}
    dcp.save({"model": model_sd, "optim": optim_sd, **extra}, checkpoint_id=str(tmp))
    rng = {f"rank{rank}": torch.get_rng_state().tolist()}
    gathered: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rng)
    if rank == 0:
        _write_json(tmp / CONFIG_FILE, model_config)
        state = dict(train_state, step=step, world_size=dist.get_world_size(), extra=sorted(extra))
        state["rng"] = {k: v for part in gathered if part for k, v in part.items()}
        _write_json(tmp / STATE_FILE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Collective: load model and optimizer state (resharded to this world size and layout) and return
    train_state. Each ``extra`` state the checkpoint holds is loaded in place; the others are left as
    they are (e.g. an EMA switched on after the checkpoint was written starts from the weights)."""
    path = Path(path)
    train_state = read_train_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    saved = set(train_state.get("extra", []))
    state = {"model": model_sd, "optim": optim_sd, **{k: v for k, v in (extra or {}).items() if k in saved}}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = train_state.get("rng", {}).get(f"rank{dist.get_rank()}")
    if own is not None and train_state.get("world_size") == dist.get_world_size():
        torch.set_rng_state(torch.tensor(own, dtype=torch.uint8))
    return train_state


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_model_config(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
