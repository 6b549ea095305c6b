"""Does the recipe learn? The classic check: the trainer overfits a handful of structures of every kind.

A model that cannot drive the force error on 8 crystals and 4 molecules it trains on far below the
zero-force baseline is broken, whatever its loss curve says. This runs the pipeline's own trainer
(`janus.train.Trainer`, FSDP on one gloo rank) with the default loss and optimiser settings, float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import ase.io
import numpy as np
import pytest

from janus import launch
from janus.config import JanusConfig
from tests.conftest import read_frames
from tests.test_janus import prepare

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
STEPS = 240


def handful(folder: Path) -> Path:
    """8 small crystals and 4 molecules of the bundled sample, as one extxyz file."""
    crystals = [a for a in read_frames(SAMPLE / "crystals_pbe.extxyz.gz", ":200") if len(a) <= 8][:8]
    molecules = [a for a in read_frames(SAMPLE / "molecules_gfn2.extxyz.gz", ":50") if len(a) >= 5][:4]
    path = folder / "handful.extxyz"
    ase.io.write(path, crystals + molecules, format="extxyz")
    return path


def force_scores(model, graphs, tasks: list[str]) -> dict[str, tuple[float, float]]:
    """Per task: cosine of predicted and reference forces, and force MAE over the zero-force MAE."""
    from matris import predict
    from matris.batch import collate

    batch = collate(graphs)
    forces = predict(model.eval(), batch)["forces"]
    out = {}
    for index, task in enumerate(tasks):
        atoms = batch.task[batch.atom_structure] == index
        if atoms.any():
            f, ref = forces[atoms].double(), batch.forces[atoms].double()
            cosine = float((f * ref).sum() / (f.norm() * ref.norm()))
            out[task] = (cosine, float((f - ref).abs().mean() / ref.abs().mean()))
    return out


def overfit(folder: Path, loss: dict | None = None) -> tuple[dict, dict]:
    """Per-task `force_scores` of the handful before and after ``STEPS`` steps of the pipeline's trainer
    (default recipe, or ``loss`` weights), plain ops. ``python -m tests.test_learning`` prints them for the
    default weights and the paper's 5:5."""
    import torch.distributed as dist

    from janus.parallel import full_tensor
    from janus.train import Trainer
    from matris import MatRIS

    data = prepare([handful(folder)], folder / "data")
    cfg = JanusConfig.model_validate({
        "model": {"preset": "tiny"},
        "loss": loss or {},
        "train": {"steps": STEPS, "max_atoms_per_batch": 512, "eval_every": 0, "kernels": "cpu"},
        "data_dir": str(data),
        "out_dir": str(folder / "train"),
    })  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=0, world_size=1)
    try:
        trainer = Trainer(cfg, launch.DistEnv(0, 1, 0, "127.0.0.1", 0, "test"))
        assert len(trainer.plan.batches(0)) == 1, "all twelve structures in every step"
        graphs = [trainer.dataset[i] for i in range(len(trainer.dataset))]
        plain, tasks = MatRIS(trainer.model_cfg), trainer.model_cfg.tasks
        plain.load_state_dict({k: full_tensor(v) for k, v in trainer.model.state_dict().items()})
        before = force_scores(plain, graphs, tasks)
        for step in range(STEPS):
            trainer.step(step)
        plain.load_state_dict({k: full_tensor(v) for k, v in trainer.model.state_dict().items()})
    finally:
        dist.destroy_process_group()
    return before, force_scores(plain, graphs, tasks)


def test_trainer_overfits_a_handful_of_crystals_and_molecules(tmp_path):
    before, after = overfit(tmp_path)
    assert set(after) == {"crystal-pbe", "molecule-gfn2"}
    for task, (cosine, relative) in after.items():
        assert before[task][1] == pytest.approx(1.0, abs=0.05), "an untrained model predicts ~no force"
        assert cosine > 0.95 and relative < 0.10, (task, cosine, relative, after)
    assert np.isfinite([v for pair in after.values() for v in pair]).all()


def test_validation_during_training_picks_the_exported_weights(tmp_path):
    """Every ``eval_every`` steps and after the last, `python -m janus.train` scores the model's and the
    EMA's weights on the held-out split: validation lines in metrics.jsonl (per task force, energy and
    stress MAE with the zero-force baseline), one console line each, the best weights kept beside the
    checkpoints; the export takes them and says which step and why; the training plot draws them."""
    import subprocess
    import sys

    import yaml

    from data_prep import DataConfig
    from data_prep import prepare as prepare_data
    from evaluation.plots import training_curves
    from janus.export import BEST_WEIGHTS_FILE, export_checkpoint
    from janus.metrics import read, training_records, validation_records
    from matris.io import metadata

    data = tmp_path / "data"
    prepare_data(DataConfig(sources=[handful(tmp_path)], val_fraction=0.4), data)
    config = {
        "model": {"preset": "tiny"},
        "train": {"steps": 6, "eval_every": 4, "checkpoint_every": 2, "ema_decay": 0.5, "warmup_steps": 1},
        "data_dir": str(data),
        "out_dir": str(tmp_path / "train"),
    }
    (tmp_path / "janus.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "janus.train", "--config", str(tmp_path / "janus.yaml")],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read(tmp_path / "train" / "metrics.jsonl")
    assert [r["step"] for r in training_records(rows)] == [1, 2, 3, 4, 5, 6]
    validations = validation_records(rows)
    expected = [(4, "model"), (4, "ema"), (6, "model"), (6, "ema")]
    assert [(r["step"], r["weights"]) for r in validations] == expected
    for record in validations:
        assert set(record["tasks"]) <= {"crystal-pbe", "molecule-gfn2"} and record["tasks"]
        for values in record["tasks"].values():
            assert values["force_zero_mae_mev_per_a"] > 0 and values["force_mae_mev_per_a"] > 0
            assert math.isfinite(values["energy_mae_mev_per_atom"])
    assert done.stdout.count("janus: validation at step") == 4
    best = [r for r in validations if r["best"]][-1]
    assert best["score"] == min(r["score"] for r in validations)
    kept = metadata(tmp_path / "train" / BEST_WEIGHTS_FILE)
    assert (kept["step"], kept["weights"]) == (best["step"], best["weights"])

    exported = tmp_path / "model.safetensors"
    info = export_checkpoint(tmp_path / "train" / "checkpoints", exported, data_dir=data)
    assert info["checkpoint"] == "step_000000006"
    assert info["weights"]["step"] == best["step"] and info["weights"]["kind"] == best["weights"]
    assert "lowest validation score" in info["weights"]["why"]
    assert training_curves(tmp_path / "train" / "metrics.jsonl", tmp_path / "training.png") is not None


if __name__ == "__main__":
    import tempfile

    for name, weights in (("default", None), ("paper 5:5", {"energy": 5.0, "force": 5.0})):
        with tempfile.TemporaryDirectory() as folder:
            _, scores = overfit(Path(folder), weights)
        print(name, {t: f"cos {c:.3f} force MAE / zero-force {r:.3f}" for t, (c, r) in scores.items()})
