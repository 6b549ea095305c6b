"""Consolidate a sharded training checkpoint into one deployable model file.

    python -m janus.export --checkpoint RUN/train/checkpoints --out RUN/export/model.safetensors
        [--keep-elements H,C,O] [--deploy RUN/export/model.pt2]
    python -m janus.export --model RUN/export/model.safetensors
        [--keep-elements H,C,O --out small.safetensors] [--deploy model.pt2]
    python -m janus.export --show RUN/export/model.safetensors

Reads the newest complete checkpoint directory (one holding ``train_state.json``) written by
`janus.checkpoint`: torch.distributed.checkpoint shards under the ``model.`` prefix plus
``model_config.json``. DCP reloads any number of shards into one process, so this needs no process group.
The checkpoint must match its checksums (`janus.checkpoint.verify`); one that does not is refused with an
error naming the file, not passed over for an older one, so a model file is never silently older than
its run: move the bad checkpoint aside and rerun the training, which resumes from the newest intact one
(or export an intact ``step_*`` directory by name). The file is written atomically and records its
provenance (checkpoint, step, world size, seed, sha256 of the data manifest, git commit, date, versions)
and the element vocabulary of the training data, so a model found on disk can be traced back to the run
and data that made it.
``--keep-elements`` prunes the MoE experts those elements cannot reach (`matris.prune`); ``--deploy``
also writes the torch.export inference artifact for MD codes (`matris.deploy`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import warnings
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from janus.checkpoint import STATE_FILE, STEP_DIR, latest, read_train_state, verify
from matris.config import ModelConfig
from matris.io import file_sha256, load, metadata, read_header, save
from matris.model import MatRIS
from matris.moe import deferred_experts, materialize_experts
from matris.prune import parse_elements, prune_elements

BEST_WEIGHTS_FILE = "best_model.safetensors"  # beside the checkpoints folder, kept by janus.validation


def newest_checkpoint(root: Path) -> Path:
    root = Path(root)
    if STEP_DIR.match(root.name) and (root / STATE_FILE).is_file():
        return root
    newest = latest(root)
    if newest is None:
        raise FileNotFoundError(f"no complete checkpoint (step_*/{STATE_FILE}) under {root}")
    return newest


def consolidate(checkpoint: Path) -> MatRIS:
    """The unsharded model held by one checkpoint directory, which must match its checksums."""
    verify(checkpoint)
    config = ModelConfig.model_validate_json((checkpoint / "model_config.json").read_text())
    with deferred_experts():  # the weights are all loaded: no random initial values for the experts
        model = MatRIS(config)
    materialize_experts(model, initialize=False)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group, as intended
        dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state["model"])
    return model.eval()


def export_checkpoint(
    root: Path,
    out_path: Path,
    data_dir: Path | None = None,
    keep_elements: list[int] | None = None,
    deploy_path: Path | None = None,
) -> dict[str, Any]:
    """Write the newest checkpoint under ``root`` as one model file; returns its provenance.

    ``data_dir`` (default: the ``data/`` folder of the run the checkpoint lies in, if there is one) gives
    the manifest whose sha256 and element vocabulary are recorded.
    """
    checkpoint = newest_checkpoint(root)
    verify(checkpoint)
    train_state = read_train_state(checkpoint)
    model, weights = _chosen_weights(checkpoint, train_state["step"])
    manifest = _find_manifest(checkpoint, data_dir)
    provenance = {
        "checkpoint": checkpoint.name,
        "step": train_state["step"],
        "weights": weights,
        "trained_world_size": train_state.get("world_size"),
        "seed": train_state.get("seed"),
        "data_manifest": str(manifest) if manifest else None,
        "data_manifest_sha256": file_sha256(manifest) if manifest else None,
        "elements": _elements(model, manifest),
        "trained_elements": {task: sorted(model.trained_elements(task)) for task in model.config.tasks},
        "git_commit": source_commit(),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "matris_version": _version("matris-janus"),
        "torch_version": torch.__version__,
    }
    if keep_elements:
        provenance["pruned_from_experts"] = model.config.num_experts
        model = prune_elements(model, keep_elements)
    save(model, Path(out_path), provenance)
    if deploy_path is not None:
        from matris.deploy import write_artifact

        write_artifact(model, Path(deploy_path), source=Path(out_path))
    return {"model": str(out_path), **provenance}


def _chosen_weights(checkpoint: Path, final_step: int) -> tuple[MatRIS, dict[str, Any]]:
    """The best-validation weights of the run (``BEST_WEIGHTS_FILE`` beside the checkpoints folder, when
    validation ran), else the checkpoint's; with where they came from and why."""
    best = checkpoint.parent.parent / BEST_WEIGHTS_FILE
    if best.is_file():
        info = metadata(best)
        if info.get("step", final_step + 1) <= final_step:
            why = (
                f"lowest validation score ({info['val_score']:.4f}: the loss weights times the held-out "
                f"energy and force MAE, mean over tasks) of the {info['weights']} weights at step "
                f"{info['step']}"
            )
            return load(best), {"step": info["step"], "kind": info["weights"], "why": why}
    why = "final checkpoint (no validation record)"
    return consolidate(checkpoint), {"step": final_step, "kind": "model", "why": why}


def export_model(
    model_path: Path,
    out_path: Path | None = None,
    keep_elements: list[int] | None = None,
    deploy_path: Path | None = None,
) -> dict[str, Any]:
    """Prune an exported model file to ``keep_elements`` (written to ``out_path``, provenance kept) and/or
    write its inference artifact to ``deploy_path``."""
    model, info, source = load(model_path), metadata(model_path), Path(model_path)
    if keep_elements:
        if out_path is None:
            raise ValueError("pruning needs an output model file")
        info = {**info, "pruned_from": str(model_path)}
        info.setdefault("pruned_from_experts", model.config.num_experts)
        model, source = prune_elements(model, keep_elements), Path(out_path)
        save(model, source, info)
    if deploy_path is not None:
        from matris.deploy import write_artifact

        write_artifact(model, Path(deploy_path), source=source)
    return {"model": str(source), **info}


def describe(path: Path) -> dict[str, Any]:
    """What a model file holds, read from its header without loading the weights."""
    header = read_header(path)
    config = json.loads(header.get("config", "{}"))
    return {
        "file": str(path),
        "bytes": Path(path).stat().st_size,
        "format": header.get("format"),
        "version": header.get("version"),
        "preset": config.get("preset"),
        "num_experts": config.get("num_experts"),
        "tasks": json.loads(header.get("tasks", "[]")),
        "reference_energies": json.loads(header.get("reference_energies", "{}")),
        "provenance": json.loads(header.get("metadata", "{}")),
    }


def exported_from(model_path: Path) -> str | None:
    """Name of the checkpoint a model file was exported from (None if unknown or unreadable)."""
    try:
        return metadata(model_path).get("checkpoint")
    except (OSError, ValueError):
        return None


def _find_manifest(checkpoint: Path, data_dir: Path | None) -> Path | None:
    """``data_dir/manifest.json``, else ``RUN/data/manifest.json`` for a checkpoint under ``RUN/train``."""
    candidates = [Path(data_dir)] if data_dir else [p / "data" for p in checkpoint.resolve().parents[:4]]
    return next((d / "manifest.json" for d in candidates if (d / "manifest.json").is_file()), None)


def _elements(model: MatRIS, manifest: Path | None) -> list[int]:
    """Elements of the training data: the manifest's element counts, else those with a reference energy."""
    if manifest is not None:
        counts = json.loads(manifest.read_text()).get("elements")
        if counts:
            return sorted(int(z) for z in counts)
    return torch.nonzero(model.reference_energy.abs().sum(0)).flatten().tolist()


def source_commit() -> str | None:
    """Commit of the source tree this package runs from, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m janus.export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoints folder or one step_* dir")
    source.add_argument("--model", type=Path, help="an exported model file to prune and/or deploy")
    source.add_argument("--show", type=Path, metavar="FILE", help="print what a model file holds")
    parser.add_argument("--out", type=Path, help="model file to write (.safetensors)")
    parser.add_argument("--data", type=Path, help="prepared data folder (default: RUN/data beside the run)")
    parser.add_argument("--keep-elements", help="prune to these elements, e.g. H,C,O (MoE models)")
    parser.add_argument("--deploy", type=Path, help="also write the torch.export inference artifact (.pt2)")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.out is None:
        parser.error("--checkpoint needs --out")
    if args.model is not None and not ((args.keep_elements and args.out) or args.deploy):
        parser.error("--model needs --keep-elements with --out, or --deploy")
    try:
        keep = parse_elements(args.keep_elements) if args.keep_elements else None
        if args.show is not None:
            info = describe(args.show)
        elif args.model is not None:
            info = export_model(args.model, args.out, keep, args.deploy)
        else:
            info = export_checkpoint(args.checkpoint, args.out, args.data, keep, args.deploy)
    except (FileNotFoundError, ValueError) as err:
        print(f"janus.export: {err}", file=sys.stderr)
        return 1
    print("\n".join(f"{key}: {json.dumps(value)}" for key, value in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
