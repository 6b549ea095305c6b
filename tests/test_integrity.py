"""Integrity of what training and export leave on disk, on real parts: DCP checkpoints written by
`python -m janus.train` on a gloo process group, and safetensors model files.

A checkpoint carries the sha256 of each of its files; resume refuses one that does not match, falls back
to the newest intact one and says so, and pruning never removes the last intact one. A model file's
digest covers its header (config, tasks, reference energies, version, metadata) as well as its tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import matris
from janus import checkpoint
from matris.io import read_header
from tests.test_evaluate_export import frames
from tests.test_janus import ROOT, SAMPLE, config

STEPS = 4  # the trained run checkpoints every step and keeps three: step_2, step_3, step_4


def train(cfg: dict[str, Any], folder: Path) -> subprocess.CompletedProcess:
    """`python -m janus.train` on as many ranks as ``cfg`` asks for, started as torchrun would; the
    return code is the first nonzero one, the output rank 0's."""
    cfg_file = folder / "run.yaml"
    cfg_file.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "janus.train", "--config", str(cfg_file)]
    world = cfg["parallel"]["dp"]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launcher = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **launcher}
    procs = []
    for rank in range(world):  # output to files: a rank blocked on a full pipe would stall the others
        with open(folder / f"rank{rank}.out", "w") as out, open(folder / f"rank{rank}.err", "w") as err:
            env_rank = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_rank, stdout=out, stderr=err))
    codes = [proc.wait(timeout=300) for proc in procs]
    code = next((c for c in codes if c), 0)
    return subprocess.CompletedProcess(
        cmd, code, (folder / "rank0.out").read_text(), (folder / "rank0.err").read_text()
    )


def run_config(data: Path, out: Path, steps: int, keep: int = 3, ranks: int = 1) -> dict[str, Any]:
    """One set of loss weights throughout (``loss.final`` off): the reruns here train one step longer than
    the run they resume, which would move the final stage and with it the losses compared."""
    cfg = config(
        data, out, (ranks, 1, 1), steps=steps, checkpoint_every=1, keep_checkpoints=keep, eval_every=0,
        max_atoms_per_batch=48,
    )  # fmt: skip
    return {**cfg, "loss": {"final": None}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """A finished run of ``STEPS`` steps on 16 crystals and 16 molecules, with its per-step losses."""
    from data_prep import DataConfig, prepare

    root = tmp_path_factory.mktemp("trained")
    sources = []
    for name in ("crystals_pbe", "molecules_gfn2"):
        source = root / f"{name}.extxyz"
        source.write_text(frames(SAMPLE / f"{name}.extxyz.gz", 16, max_atoms=12))
        sources.append(source)
    data = root / "data"
    prepare(DataConfig(sources=sources, val_fraction=0.0), data)
    result = train(run_config(data, root / "run", STEPS), root)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"data": data, "run": root / "run", "loss": {r["step"]: r["loss"] for r in lines}}


def copy_run(trained: dict[str, Any], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    return run


def shard(step_dir: Path) -> Path:
    return next(step_dir.glob("*.distcp"))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "ranks"), [(flip_byte, 1), (truncate, 2)], ids=["flipped-byte-1-rank", "truncated-2-ranks"]
)
def test_resume_falls_back_from_a_damaged_newest_checkpoint(trained, tmp_path, damage, ranks):
    """The newest checkpoint's shard flipped or cut: the rerun (on two ranks, which must agree on the
    verdict) says which file of which checkpoint is wrong, sets it aside, resumes from the previous one
    and repeats the uninterrupted run's losses."""
    run = copy_run(trained, tmp_path)
    bad = run / "checkpoints" / "step_000000004"
    damage(shard(bad))
    result = train(run_config(trained["data"], run, STEPS + 1, ranks=ranks), tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{bad}" in result.stderr and shard(bad).name in result.stderr, result.stderr
    assert "resumed from" in result.stdout and "step_000000003" in result.stdout
    assert names(run / "checkpoints") == [
        "step_000000003", "step_000000004", "step_000000004.corrupt", "step_000000005",
    ]  # fmt: skip
    kept = run / "checkpoints" / "step_000000004.corrupt"
    assert checkpoint.problem(kept) is not None and checkpoint.problem(bad) is None
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 2))
    assert lines[3]["loss"] == pytest.approx(trained["loss"][4], rel=1e-9)


def test_no_intact_checkpoint_is_a_clear_error_that_moves_nothing(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    before = names(run / "checkpoints")
    for step_dir in (run / "checkpoints").iterdir():
        flip_byte(shard(step_dir))
    result = train(run_config(trained["data"], run, STEPS + 1), tmp_path)
    assert result.returncode == 2, result.stdout
    for name in before:
        assert name in result.stderr
    assert f"move {run / 'checkpoints'} away" in result.stderr
    assert names(run / "checkpoints") == before


def test_checkpoints_that_verify_but_do_not_load_are_named_not_set_aside(trained, tmp_path):
    """Checkpoints of another model (here: narrower) are intact but cannot load: the rerun stops with an
    error naming each and the loader's complaint, and moves none of them aside as corrupt."""
    run = copy_run(trained, tmp_path)
    before = names(run / "checkpoints")
    cfg = run_config(trained["data"], run, STEPS + 1)
    cfg["model"]["overrides"] = {"dim": 16, "num_heads": 2, "expert_hidden": 16}
    result = train(cfg, tmp_path)
    assert result.returncode == 2, result.stdout
    for name in before:
        assert f"{name}: loading it failed on rank 0: ValueError: Size mismatch" in result.stderr
    assert "model configuration" in result.stderr
    assert names(run / "checkpoints") == before


def test_pruning_keeps_the_newest_verified_checkpoints(trained, tmp_path, monkeypatch, capsys):
    """A checkpoint damaged on disk during the run: the next save keeps ``keep`` intact ones (it would
    have deleted the last of them), sets the damaged one aside, and `checkpoint.load` refuses it."""
    import torch.distributed as dist

    from janus import launch
    from janus.config import JanusConfig
    from janus.train import Trainer
    from matris import fused

    monkeypatch.setattr(fused._Compiled, "enabled", False)
    run = copy_run(trained, tmp_path)
    cfg = JanusConfig.model_validate(run_config(trained["data"], run, STEPS + 1, keep=2))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = Trainer(cfg, launch.DistEnv(0, 1, 0, "127.0.0.1", 0, "test"))
        assert trainer.resume() == STEPS
        bad = run / "checkpoints" / "step_000000004"
        flip_byte(shard(bad))
        trainer.save(STEPS + 1, trainer.step(STEPS).record["epoch"])
        assert names(run / "checkpoints") == ["step_000000003", "step_000000004.corrupt", "step_000000005"]
        assert f"{bad}" in capsys.readouterr().err
        kept = run / "checkpoints" / "step_000000004.corrupt"
        with pytest.raises(checkpoint.CheckpointError, match=rf"{shard(kept).name}.*sha256"):
            checkpoint.load(kept, trainer.model, trainer.optimizer)
    finally:
        dist.destroy_process_group()


def test_verify_names_the_file_and_what_is_wrong(trained, tmp_path):
    step_dir = tmp_path / "step_000000004"
    shutil.copytree(trained["run"] / "checkpoints" / step_dir.name, step_dir)
    checkpoint.verify(step_dir)
    listed = json.loads((step_dir / checkpoint.MANIFEST_FILE).read_text())["files"]
    assert {".metadata", checkpoint.STATE_FILE, checkpoint.CONFIG_FILE, shard(step_dir).name} <= set(listed)

    (step_dir / "stray.txt").write_text("x")
    with pytest.raises(
        checkpoint.CheckpointError, match=rf"{re.escape(str(step_dir))}.*stray\.txt is not listed"
    ):
        checkpoint.verify(step_dir)
    (step_dir / "stray.txt").unlink()
    metadata = (step_dir / ".metadata").read_bytes()
    (step_dir / ".metadata").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata is missing"):
        checkpoint.verify(step_dir)
    (step_dir / ".metadata").write_bytes(metadata[:-1])
    with pytest.raises(checkpoint.CheckpointError, match=r"\.metadata has \d+ bytes, .* records \d+"):
        checkpoint.verify(step_dir)
    (step_dir / checkpoint.MANIFEST_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"has no checksums\.json"):
        checkpoint.verify(step_dir)


def test_export_refuses_a_checkpoint_that_fails_verification(trained, tmp_path, capsys):
    from janus.export import export_checkpoint
    from janus.export import main as export_cli

    run = copy_run(trained, tmp_path)
    bad = run / "checkpoints" / "step_000000004"
    out = tmp_path / "model.safetensors"
    flip_byte(shard(bad))
    code = export_cli(
        ["--checkpoint", str(run / "checkpoints"), "--out", str(out), "--data", str(trained["data"])]
    )
    assert code == 1 and not out.exists()
    err = capsys.readouterr().err
    assert f"{bad}" in err and shard(bad).name in err and "sha256" in err
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(bad))):
        export_checkpoint(run / "checkpoints", out, trained["data"])
    assert not out.exists()
    assert export_checkpoint(run / "checkpoints" / "step_000000003", out, trained["data"])["step"] == 3


# -- model files -----------------------------------------------------------------------------------------


def energy(model: matris.MatRIS) -> float:
    from ase.build import bulk

    from matris.calculator import MatRISCalculator

    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.calc = MatRISCalculator(model, task=model.config.tasks[0])
    return atoms.get_potential_energy()


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = matris.MatRIS(matris.ModelConfig.from_preset("tiny", tasks=["crystal-pbe", "molecule-gfn2"]))
    model.set_reference_energies({"crystal-pbe": {"29": -3.7}, "molecule-gfn2": {"1": -13.6}})
    return matris.save(model.eval(), tmp_path / "model.safetensors", {"step": 7})


def test_a_byte_of_the_header_config_changes_the_digest(model_file, tmp_path):
    """``score_cap`` 5.0 edited to 3.0 in place: the energy would change, so the file is refused."""
    data = model_file.read_bytes()
    field = b'\\"score_cap\\":5.0'
    assert data.count(field) == 1
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(data.replace(field, field.replace(b"5.0", b"3.0")))
    header = read_header(edited)
    assert json.loads(header["config"])["score_cap"] == 3.0
    with pytest.raises(ValueError, match=rf"{re.escape(str(edited))} is corrupted"):
        matris.load(edited)
    config = matris.ModelConfig.model_validate_json(header["config"])
    model = matris.load(model_file)
    unchecked = matris.MatRIS(config)
    unchecked.load_state_dict(model.state_dict())
    assert energy(unchecked.eval()) != pytest.approx(energy(model), abs=1e-6)  # why it must be refused


@pytest.mark.parametrize("key", ["tasks", "reference_energy", "reference_energies", "metadata"])
def test_every_header_field_is_covered_by_the_digest(model_file, tmp_path, key):
    tensors, header = load_file(model_file), read_header(model_file)
    value = json.loads(header[key])
    changed = value[::-1] if isinstance(value, list) else {**value, "extra": 1}
    assert changed != value
    path = tmp_path / "changed.safetensors"
    save_file(tensors, path, metadata={**header, key: json.dumps(changed)})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupted"):
        matris.load(path)


def test_an_older_model_file_is_refused_with_the_re_export_command(model_file, tmp_path):
    tensors, header = load_file(model_file), read_header(model_file)
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={**header, "version": "1"})
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(old))} was written by an older version.*python -m janus\.export"
    ):
        matris.load(old)


def test_the_workflow_names_a_damaged_model_file_and_exports_again(model_file, tmp_path):
    """`workflows.stages.export_problem`: a flipped tensor byte in the exported model makes the export
    stage incomplete, with the file and the fault named (the pipeline prints it and exports again)."""
    from workflows.stages import export_problem

    copy = tmp_path / "model.safetensors"
    copy.write_bytes(model_file.read_bytes())
    assert export_problem(copy) is None
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x01
    copy.write_bytes(bytes(data))
    expected = f"{copy} is corrupted: its sha256 does not match its header fields and tensors"
    assert export_problem(copy) == expected
    assert export_problem(tmp_path / "absent.safetensors").endswith("does not exist")
