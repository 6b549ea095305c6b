"""Consolidate a sharded training checkpoint into one deployable model file.

    python -m matris.export --checkpoint RUN/train/checkpoints --out RUN/export/model.safetensors

Reads the newest complete checkpoint directory (one holding ``train_state.json``) written by
`janus.checkpoint`: torch.distributed.checkpoint shards under the ``model.`` prefix plus
``model_config.json``. DCP reloads any number of shards into one process, so this needs no process group
and no janus import; the result is written atomically with the checkpoint it came from in its metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

from matris.config import ModelConfig
from matris.io import metadata, save
from matris.model import MatRIS

STEP_DIR = re.compile(r"^step_(\d+)$")


def newest_checkpoint(root: Path) -> Path:
    root = Path(root)
    if STEP_DIR.match(root.name) and (root / "train_state.json").is_file():
        return root
    done = [p for p in root.glob("step_*") if STEP_DIR.match(p.name) and (p / "train_state.json").is_file()]
    if not done:
        raise FileNotFoundError(f"no complete checkpoint (step_*/train_state.json) under {root}")
    return max(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def consolidate(checkpoint: Path) -> MatRIS:
    """The unsharded model held by one checkpoint directory."""
    config = ModelConfig.model_validate_json((checkpoint / "model_config.json").read_text())
    model = MatRIS(config)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group, as intended
        dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])
    return model.eval()


def export_checkpoint(root: Path, out_path: Path) -> dict[str, Any]:
    checkpoint = newest_checkpoint(root)
    train_state = json.loads((checkpoint / "train_state.json").read_text())
    model = consolidate(checkpoint)
    provenance = {
        "checkpoint": checkpoint.name,
        "step": train_state["step"],
        "trained_world_size": train_state.get("world_size"),
        "seed": train_state.get("seed"),
    }
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save(model, tmp, metadata=provenance)
    os.replace(tmp, out_path)
    return {"model": str(out_path), **provenance}


def exported_from(model_path: Path) -> str | None:
    """Name of the checkpoint a model file was exported from (None if unknown or unreadable)."""
    try:
        return metadata(model_path).get("checkpoint")
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matris.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoints folder or one step_* dir")
    parser.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    args = parser.parse_args(argv)
    try:
        info = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"matris.export: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
