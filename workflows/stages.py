"""Parsl apps of the pretraining DAG and each stage's own completeness check.

The apps are thin: each calls a library function or command line (`data_prep`, `janus.train`,
`janus.export`, `evaluation.evaluate`) so the libraries stay free of Parsl. Arguments ``key`` (a digest of
the config a stage's outputs depend on) and ``attempt`` (a salt for forced reruns) exist only for the
cache key. All apps are cached: with the
site's `BasicMemoizer(checkpoint_mode="task_exit")` a rerun in the same run directory skips apps that
finished. Each library call also checks its own outputs (a verified shard, a final checkpoint, an export
whose checksum matches) and skips work that is already done, so a lost Parsl checkpoint costs nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from parsl import bash_app, python_app
from parsl.data_provider.files import File
from parsl.dataflow.memoization import id_for_memo


@id_for_memo.register(File)
def _file_memo_id(file: File, output_ref: bool = False) -> bytes:
    """Parsl registers no memo hash for `File`, so an app taking one could not be cached: identify a
    `File` by its path."""
    return hashlib.sha256(f"File:{file.filepath}".encode()).digest()


@python_app(executors=["stages"], cache=True)
def prepare_chunk(chunk: dict, data_config: dict, out_dir: str, attempt: int = 0) -> dict:
    """Read, validate, build graphs and write the shard(s) of one input chunk (plain dicts in and out,
    which Parsl's memoizer can hash)."""
    from dataclasses import asdict

    from data_prep.config import DataConfig
    from data_prep.pipeline import Chunk, write_chunk

    return asdict(write_chunk(Chunk(**chunk), DataConfig.model_validate(data_config), Path(out_dir)))


@python_app(executors=["stages"], cache=True)
def finalize_data(
    data_config: dict, out_dir: str, attempt: int = 0, inputs: tuple = (), outputs: tuple = ()
) -> dict:
    """Merge the chunk results (``inputs``): quarantine report, reference energies, manifest.json."""
    from data_prep.config import DataConfig
    from data_prep.pipeline import Chunk, ChunkResult, finalize

    results = [ChunkResult(**{**r, "chunk": Chunk(**r["chunk"])}) for r in inputs]
    manifest = finalize(Path(out_dir), DataConfig.model_validate(data_config), results)
    return {"n_structures": manifest["n_structures"], "n_rejected": manifest["n_rejected"]}


@bash_app(executors=["train"], cache=True)
def train(
    command: str,
    key: str = "",
    attempt: int = 0,
    inputs: tuple = (),
    outputs: tuple = (),
    stdout: str | None = None,
    stderr: str | None = None,
    parsl_resource_specification: dict | None = None,
) -> str:
    """Launch the training ranks with the site's launcher; janus resumes from its last checkpoint.
    ``parsl_resource_specification`` (nodes, ranks per node) is read by the MPIExecutor of batch sites."""
    return command


@python_app(executors=["stages"], cache=True)
def export(
    checkpoint_root: str,
    out_path: str,
    data_dir: str,
    key: str = "",
    attempt: int = 0,
    inputs: tuple = (),
    outputs: tuple = (),
) -> dict:
    """Consolidate the newest sharded checkpoint into one self-contained model file (with the trained
    elements and the manifest's checksum from ``data_dir``)."""
    from janus.export import export_checkpoint

    return export_checkpoint(Path(checkpoint_root), Path(out_path), data_dir=Path(data_dir))


@python_app(executors=["stages"], cache=True)
def evaluate(
    model_path: str, data_dir: str, out_dir: str, eval_config: dict, key: str = "", attempt: int = 0,
    inputs: tuple = (), outputs: tuple = (),
) -> dict:  # fmt: skip
    """Per-task errors of the exported model on the held-out split."""
    from evaluation.evaluate import evaluate_model

    baseline = eval_config.get("baseline")
    return evaluate_model(
        Path(model_path), Path(data_dir), Path(out_dir), max_per_task=eval_config["max_structures_per_task"],
        md_steps=eval_config["md_steps"], baseline=Path(baseline) if baseline else None,
    )  # fmt: skip


def submit_data(data, data_dir: Path, attempt: int = 0) -> tuple[list, Any]:
    """One cached app per input chunk, then the manifest app; returns (chunk futures, manifest future).
    The plan is written first, so that the progress view counts chunks against it."""
    from data_prep.pipeline import plan_chunks, write_plan

    data_cfg = data.model_dump(mode="json")
    planned = plan_chunks(data)
    write_plan(data_dir, data, planned)
    chunks = [prepare_chunk(asdict(c), data_cfg, str(data_dir), attempt=attempt) for c in planned]
    manifest_file = File(str(data_dir / "manifest.json"))
    manifest = finalize_data(data_cfg, str(data_dir), attempt=attempt, inputs=chunks, outputs=[manifest_file])
    return chunks, manifest


def submit_train(
    ctx, command: str, train_dir: Path, manifest, key: str, launch, attempt: int = 0
) -> Any:  # fmt: skip
    """The training bash app after ``manifest``; batch sites get the task's nodes and ranks (``launch``)
    as its resource specification (an MPIExecutor places the ranks)."""
    train_resources = ctx.site_module.train_resources
    resources = train_resources(ctx.site, launch) if train_resources is not None else None
    return train(
        command, key=key, attempt=attempt,
        inputs=[manifest.outputs[0]], outputs=[File(str(train_dir / "checkpoints"))],
        stdout=str(train_dir / "train.log"), stderr=str(train_dir / "train.err"),
        **({"parsl_resource_specification": resources} if resources else {}),
    )  # fmt: skip


def data_complete(data_dir: Path) -> bool:
    return data_problem(data_dir) is None


def data_problem(data_dir: Path) -> str | None:
    from data_prep.pipeline import problem

    return problem(data_dir)


def train_complete(train_dir: Path, steps: int) -> bool:
    """The newest checkpoint verifies and reached ``steps`` or spent ``train.time_budget_s`` (a damaged one
    sends the run back to training, which resumes from the newest intact checkpoint)."""
    from janus.checkpoint import latest, problem, read_train_state

    last = latest(train_dir / "checkpoints")
    if last is None or problem(last) is not None:
        return False
    state = read_train_state(last)
    return state["step"] >= steps or state.get("time_budget_spent", False)


def export_complete(model_path: Path, train_dir: Path) -> bool:
    from janus.checkpoint import latest
    from janus.export import exported_from

    last = latest(train_dir / "checkpoints")
    return export_problem(model_path) is None and last is not None and exported_from(model_path) == last.name


def export_problem(model_path: Path) -> str | None:
    """What is wrong with an exported model file (missing, foreign, corrupted), or None."""
    from matris.io import verified

    if not model_path.is_file():
        return f"{model_path} does not exist"
    try:
        verified(model_path)
    except ValueError as error:
        return str(error)
    return None


def eval_complete(eval_dir: Path, model_path: Path) -> bool:
    from evaluation.evaluate import evaluated_model
    from matris.io import file_sha256

    metrics = eval_dir / "metrics.json"
    return metrics.is_file() and model_path.is_file() and evaluated_model(metrics) == file_sha256(model_path)
