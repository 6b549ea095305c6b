"""Sharded checkpoints with torch.distributed.checkpoint, written atomically, verified and kept K deep.

Layout of one checkpoint (a directory under ``train/checkpoints/``)::

    step_000050/
        *.distcp, .metadata     model and optimizer state (and the EMA, if on), sharded (DCP): reloads on
                                any world size and layout; ``model.*`` keys consolidate to the
                                single-device `matris.MatRIS` state dict (expert shards included)
        model_config.json       the resolved matris.ModelConfig, so export can rebuild the model alone
        train_state.json        step, scheduler, data position, RNG states, training seconds spent
        checksums.json          size and sha256 of every other file in the directory; written last

All ranks write into ``step_000050.tmp/``; after a barrier rank 0 adds the JSON files and the checksums
and renames the directory, so a directory without the ``.tmp`` suffix is always complete. A job killed
mid-write leaves a ``.tmp`` directory that the next save removes.

A checkpoint is verified against its checksums before it is loaded (rank 0 hashes, every rank gets the
verdict): a flipped or truncated file is refused, not loaded. `resume` then falls back to the newest
checkpoint that verifies and loads, says so, and renames each bad one to ``step_000050.corrupt`` rather
than deleting it; pruning keeps the ``keep`` newest checkpoints that verify. DCP's ``.metadata`` is a
pickle, so loading a checkpoint runs code it contains: load only checkpoints you trust, since the
checksums catch damage, not tampering.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from matris.io import file_sha256, write_atomic

STEP_DIR = re.compile(r"^step_(\d{9})$")
STATE_FILE = "train_state.json"
CONFIG_FILE = "model_config.json"
MANIFEST_FILE = "checksums.json"
SET_ASIDE = ".corrupt"


class CheckpointError(ValueError):
    """A checkpoint that fails verification or cannot be loaded."""


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:09d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None; not verified (`verify`, `resume` do that)."""
    return next(iter(complete(root)), None)


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name, reverse=True)


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
        write_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep, sealed=final)
    dist.barrier()
    return final


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Collective: verify checkpoint ``path`` (`CheckpointError` if it fails), then load model and
    optimizer state (resharded to this world size and layout) and return train_state. Each ``extra``
    state the checkpoint holds is loaded in place; the others are left as they are (e.g. an EMA switched
    on after the checkpoint was written starts from the weights)."""
    wrong = _from_rank0(lambda: problem(path))
    if wrong is not None:
        raise CheckpointError(f"checkpoint {path}: {wrong}")
    return _load(Path(path), model, optimizer, extra)


def resume(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Collective: load the newest checkpoint under ``root`` that verifies and loads, as `load`; returns
    it and its train_state, or None if there is no checkpoint.

    Each newer one that fails is reported on stderr and, once an older one has loaded, renamed to
    ``step_*.corrupt``. If none loads, nothing is moved and `CheckpointError` names them all: starting
    afresh over them is the user's decision."""
    failed: list[tuple[Path, str]] = []
    for path in _from_rank0(lambda: complete(root)):
        wrong = _from_rank0(lambda p=path: problem(p))
        if wrong is None:
            state, wrong = _attempt(path, model, optimizer, extra)
            if wrong is None:
                if dist.get_rank() == 0:
                    for bad, _ in failed:
                        moved = _set_aside(bad).name
                        _say(f"janus: moved unusable checkpoint {bad} to {moved}; resuming from {path.name}")
                dist.barrier()
                return path, state
        if dist.get_rank() == 0:
            _say(f"janus: checkpoint {path} is unusable: {wrong}")
        failed.append((path, wrong))
    if failed:
        listing = "".join(f"\n  {path}: {wrong}" for path, wrong in failed)
        raise CheckpointError(
            f"no checkpoint under {root} verifies and loads:{listing}\n"
            f"move {root} away to train from scratch, or rerun with the model configuration they were "
            "written with"
        )
    return None


def _attempt(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, dict[str, torch.Tensor]] | None,
) -> tuple[dict[str, Any] | None, str | None]:
    """`_load`, with the first rank's error, if any rank had one, on every rank, so all go on alike."""
    try:
        state, error = _load(path, model, optimizer, extra), None
    except (Exception, CheckpointException) as e:
        state, error = None, f"loading it failed on rank {dist.get_rank()}: {_describe(e)}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    return (state, None) if error is None else (None, error)


def _describe(error: BaseException) -> str:
    """One line for an exception; DCP's wraps each rank's, with its traceback, in a CheckpointException."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, dict[str, torch.Tensor]] | None,
) -> dict[str, Any]:
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


def write_checksums(path: Path) -> None:
    """Record the size and sha256 of every file in checkpoint directory ``path`` in ``MANIFEST_FILE``."""
    path = Path(path)
    files = {
        name: {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}
        for name in _files(path)
        if name != MANIFEST_FILE
    }
    _write_json(path / MANIFEST_FILE, {"algorithm": "sha256", "files": files})


def problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` against its checksums, naming each file, or None if it
    verifies."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return (
            f"has no {MANIFEST_FILE}: it was written without checksums (by an older janus, or not by "
            "janus), so it cannot be verified"
        )
    try:
        listed = {
            str(name): (int(entry["bytes"]), str(entry["sha256"]))
            for name, entry in json.loads(manifest.read_text())["files"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"
    present = set(_files(path)) - {MANIFEST_FILE}
    wrong = [f"{name} is not listed in {MANIFEST_FILE}" for name in sorted(present - set(listed))]
    for name, (size, digest) in sorted(listed.items()):
        if name not in present:
            wrong.append(f"{name} is missing")
        elif (found := (path / name).stat().st_size) != size:
            wrong.append(f"{name} has {found} bytes, {MANIFEST_FILE} records {size} (cut short?)")
        elif file_sha256(path / name) != digest:
            wrong.append(f"{name} does not match its sha256 in {MANIFEST_FILE} (altered since written)")
    return "; ".join(wrong) or None


def verify(path: Path) -> None:
    """Raise `CheckpointError`, naming the checkpoint, the file and what is wrong, unless ``path``
    matches its checksums. One process, no collectives (export uses it)."""
    wrong = problem(path)
    if wrong is not None:
        raise CheckpointError(f"checkpoint {path}: {wrong}")


def read_train_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_model_config(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def _prune(root: Path, keep: int, sealed: Path) -> None:
    """Keep the ``keep`` newest checkpoints that verify (``sealed`` was just written and hashed); set
    aside the damaged ones among them, remove the older ones and any ``.tmp`` leftovers."""
    intact = 0
    for path in sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True):
        if intact >= keep:
            shutil.rmtree(path, ignore_errors=True)
        elif path == sealed or (wrong := problem(path)) is None:
            intact += 1
        else:
            _say(f"janus: checkpoint {path} fails verification: {wrong}; moved it to {_set_aside(path).name}")
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _set_aside(path: Path) -> Path:
    """Rename a bad checkpoint out of the way (``step_*.corrupt``, numbered if taken), kept to inspect."""
    target, n = path.with_name(path.name + SET_ASIDE), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{SET_ASIDE}{n}")
    os.replace(path, target)
    return target


def _files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _from_rank0(compute: Callable[[], Any]) -> Any:
    """``compute()`` run on rank 0 and broadcast, so every rank acts on the same verdict."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=1))
