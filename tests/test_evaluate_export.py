"""Evaluate and export on real files: a prepared slice of the sample data, tiny models, a DCP checkpoint.

Covers the metrics, plots, MD stability lines, finite-difference check and baseline table of
`evaluation.evaluate`; provenance, refusal of bad files and expert pruning of `janus.export`/`matris.prune`;
the torch.export inference artifact of `matris.deploy` against the ASE calculator; and loading an export
in a process that imports nothing but matris.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from safetensors.torch import load_file, save_file

import matris
from data_prep import DataConfig, iter_atoms, prepare
from evaluation.evaluate import FD_FORCE_TOLERANCE, FD_STRESS_TOLERANCE, evaluate_model, one_thread
from evaluation.evaluate import main as evaluate_cli
from janus.checkpoint import write_checksums
from janus.export import describe, export_checkpoint, exported_from
from janus.export import main as export_cli
from matris.calculator import MatRISCalculator
from matris.config import ModelConfig
from matris.deploy import DeployedCalculator, load_artifact, write_artifact
from matris.io import read_header
from matris.model import MatRIS
from matris.moe import MoE
from matris.prune import prune_elements

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TASKS = ["crystal-pbe", "molecule-gfn2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread, as `evaluate_model` uses: small structures one at a time run slower on two."""
    with one_thread():
        yield


def frames(path: Path, count: int, max_atoms: int) -> str:
    """The first ``count`` extxyz frames of at most ``max_atoms`` atoms, copied verbatim."""
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines(keepends=True)
    out, k = [], 0
    while k < len(lines) and len(out) < count:
        n = int(lines[k])
        if n <= max_atoms:
            out.append("".join(lines[k : k + n + 2]))
        k += n + 2
    return "".join(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """24 small crystals and 24 molecules, half of them held out: two tasks, periodic and not."""
    root = tmp_path_factory.mktemp("data")
    sources = []
    for name in ("crystals_pbe", "molecules_gfn2"):
        source = root / f"{name}.extxyz"
        source.write_text(frames(SAMPLE / f"{name}.extxyz.gz", 24, max_atoms=12))
        sources.append(source)
    prepare(DataConfig(sources=sources, val_fraction=0.5), root / "run" / "data")
    return root / "run" / "data"


def tiny_model(data_dir: Path, seed: int, **overrides) -> MatRIS:
    """A tiny MatRIS-MoE with the data's reference energies, so energies have the right scale."""
    torch.manual_seed(seed)
    model = MatRIS(ModelConfig.from_preset("tiny", tasks=TASKS, **overrides))
    model.set_reference_energies(json.loads((data_dir / "manifest.json").read_text())["reference_energies"])
    return model.eval()


@pytest.fixture(scope="module")
def model_file(data_dir: Path) -> Path:
    return matris.save(tiny_model(data_dir, seed=0), data_dir.parent / "export" / "model.safetensors")


def test_evaluate_writes_metrics_plots_md_and_baseline(data_dir, model_file, capsys):
    run = data_dir.parent
    baseline = matris.save(tiny_model(data_dir, seed=1), run / "other.safetensors")
    (run / "train").mkdir(exist_ok=True)
    lines = [
        {"step": s, "loss": 10 / s, "lr": 1e-3, "atoms_per_s": 100 + s, "crystal-pbe/energy": 1 / s,
         "crystal-pbe/force": 2 / s, "molecule-gfn2/energy": 3 / s}
        for s in range(1, 6)
    ]  # fmt: skip
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    code = evaluate_cli([
        "--model", str(model_file), "--data", str(data_dir), "--out", str(run / "eval"),
        "--baseline", str(baseline), "--md-steps", "20", "--fd-structures", "2",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    metrics = json.loads((run / "eval" / "metrics.json").read_text())

    assert metrics["model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert set(metrics["tasks"]) == set(TASKS) == set(metrics["baseline"]["tasks"])
    for task, values in metrics["tasks"].items():
        assert values["n_structures"] > 0
        keys = ["energy_mae_mev_per_atom", "energy_rmse_mev_per_atom", "force_mae_mev_per_a",
                "force_rmse_mev_per_a", "force_cosine"]  # fmt: skip
        if task == "crystal-pbe":
            keys += ["stress_mae_mev_per_a3", "stress_mae_gpa"]
        else:
            assert values["stress_mae_mev_per_a3"] is None
        for key in keys:
            assert math.isfinite(values[key]), (task, key)
        assert values["energy_rmse_mev_per_atom"] >= values["energy_mae_mev_per_atom"] >= 0
        assert -1 <= values["force_cosine"] <= 1
    assert metrics["baseline"]["tasks"] != metrics["tasks"]  # another model, same structures
    for task in TASKS:
        assert metrics["baseline"]["tasks"][task]["n_structures"] == metrics["tasks"][task]["n_structures"]

    # Side by side: each task's row, then its baseline's row.
    table = printed.splitlines()
    row = next(k for k, line in enumerate(table) if line.startswith("crystal-pbe "))
    assert table[row + 1].startswith("  baseline ")

    # One MD run per periodic task and one molecule, each printed on one line.
    md = {record["task"]: record for record in metrics["md"]}
    assert set(md) == set(TASKS)
    assert md["crystal-pbe"]["periodic"] and not md["molecule-gfn2"]["periodic"]
    for task, record in md.items():
        assert record["steps"] == record["requested_steps"] == 20 and record["stable"], record
        assert math.isfinite(record["drift_mev_per_atom_per_ps"]) and record["min_distance_a"] > 0.5
        assert f"MD {task} {record['formula']}" in printed

    fd = metrics["fd_check"]
    assert fd["passed"] and len(fd["structures"]) == 2
    assert fd["max_force_error_ev_per_a"] < FD_FORCE_TOLERANCE
    assert fd["max_stress_error_ev_per_a3"] < FD_STRESS_TOLERANCE
    assert "finite differences" in printed

    for name in ("parity", "training"):
        assert Path(metrics["plots"][name]).read_bytes().startswith(PNG)


def test_metrics_equal_an_independent_calculation(data_dir, model_file, tmp_path):
    metrics = evaluate_model(model_file, data_dir, tmp_path, md_steps=0, fd_structures=0, plots=False)
    calculator = MatRISCalculator(model_file, task="molecule-gfn2")
    errors, forces = [], []
    for atoms in iter_atoms(data_dir, split="val"):
        if atoms.info["task"] == "molecule-gfn2":
            reference_energy, reference_forces = atoms.get_potential_energy(), atoms.get_forces()
            atoms.calc = calculator
            errors.append(abs(atoms.get_potential_energy() - reference_energy) / len(atoms))
            forces.append(np.abs(atoms.get_forces() - reference_forces).ravel())
    values = metrics["tasks"]["molecule-gfn2"]
    assert values["n_structures"] == len(errors)
    assert values["energy_mae_mev_per_atom"] == pytest.approx(1000 * np.mean(errors), rel=1e-4)
    assert values["force_mae_mev_per_a"] == pytest.approx(1000 * np.concatenate(forces).mean(), rel=1e-4)


def write_checkpoint(run: Path, model: MatRIS, step: int) -> Path:
    """A janus-layout checkpoint written by torch.distributed.checkpoint in one process, with checksums."""
    checkpoint = run / "train" / "checkpoints" / f"step_{step:09d}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says so and writes one shard
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(checkpoint))
    (checkpoint / "model_config.json").write_text(model.config.model_dump_json())
    (checkpoint / "train_state.json").write_text(json.dumps({"step": step, "world_size": 4, "seed": 7}))
    write_checksums(checkpoint)
    return checkpoint


def test_export_consolidates_checkpoint_with_provenance(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    manifest = (data_dir / "manifest.json").read_bytes()
    (run / "data" / "manifest.json").write_bytes(manifest)
    model = tiny_model(data_dir, seed=2)
    write_checkpoint(run, tiny_model(data_dir, seed=3), step=4)
    write_checkpoint(run, model, step=8)

    out = run / "export" / "model.safetensors"
    out.parent.mkdir()
    info = export_checkpoint(run / "train" / "checkpoints", out)
    assert exported_from(out) == "step_000000008" == info["checkpoint"]
    provenance = matris.io.metadata(out)
    assert provenance["step"] == 8 and provenance["trained_world_size"] == 4 and provenance["seed"] == 7
    assert provenance["data_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert provenance["elements"] == sorted(int(z) for z in json.loads(manifest)["elements"])
    assert provenance["exported_at"] and provenance["torch_version"] == torch.__version__

    loaded = matris.load(out)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    shown = describe(out)
    assert shown["tasks"] == TASKS and shown["provenance"]["step"] == 8
    references = json.loads(manifest)["reference_energies"]["molecule-gfn2"]
    assert shown["reference_energies"]["molecule-gfn2"]["H"] == pytest.approx(references["1"], rel=1e-6)

    assert export_cli(["--show", str(out)]) == 0
    assert "\nprovenance: " in capsys.readouterr().out
    assert export_cli(["--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


def test_load_refuses_corrupted_and_incompatible_files(model_file, tmp_path):
    data = bytearray(model_file.read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="corrupted"):
        matris.load(tmp_path / "flipped.safetensors")

    tensors, header = load_file(model_file), read_header(model_file)
    save_file(tensors, tmp_path / "future.safetensors", metadata={**header, "version": "99"})
    with pytest.raises(ValueError, match="version '99'; this code reads 2"):
        matris.load(tmp_path / "future.safetensors")

    config = {**json.loads(header["config"]), "attention": "flash"}  # a field this code does not know
    save_file(tensors, tmp_path / "alien.safetensors", metadata={**header, "config": json.dumps(config)})
    with pytest.raises(ValueError, match="incompatible"):
        matris.load(tmp_path / "alien.safetensors")

    with pytest.raises(ValueError, match=r"not a readable torch\.export artifact"):
        load_artifact(model_file)


def test_pruning_keeps_predictions_shrinks_file_and_refuses_other_elements(data_dir, tmp_path, capsys):
    model = tiny_model(data_dir, seed=4, num_experts=16).double()
    with torch.no_grad():  # a trained router is peaked: make routing differ visibly between elements
        for layer in (m for m in model.modules() if isinstance(m, MoE)):
            layer.router.normal_(0, 1.0)
    full = matris.save(model, tmp_path / "full.safetensors")
    keep = "H,C,N,O"
    assert (
        export_cli(["--model", str(full), "--keep-elements", keep, "--out", str(tmp_path / "hcno.st")]) == 0
    )
    assert "pruned_from_experts" in capsys.readouterr().out
    pruned = matris.load(tmp_path / "hcno.st")

    assert pruned.config.num_experts < model.config.num_experts
    assert (tmp_path / "hcno.st").stat().st_size < 0.8 * full.stat().st_size
    size = {m: sum(p.numel() * p.element_size() for p in m.parameters()) for m in (model, pruned)}
    assert size[pruned] < 0.8 * size[model]

    molecules = [a for a in iter_atoms(data_dir) if set(a.get_chemical_symbols()) <= set(keep.split(","))]
    assert len(molecules) >= 5
    for atoms in molecules[:8]:
        a, b = atoms.copy(), atoms.copy()
        a.info.update(atoms.info)
        b.info.update(atoms.info)
        a.calc, b.calc = (
            MatRISCalculator(model, task="molecule-gfn2"),
            MatRISCalculator(pruned, "molecule-gfn2"),
        )
        assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-6
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-6, rtol=0)

    copper = bulk("Cu", "fcc", a=3.6)
    copper.calc = MatRISCalculator(pruned, task="crystal-pbe")
    with pytest.raises(ValueError, match="pruned to elements H,C,N,O; the structure also contains Cu"):
        copper.get_potential_energy()
    with pytest.raises(ValueError, match="no MoE layers"):
        prune_elements(tiny_model(data_dir, seed=0, moe_blocks=[]), [1])


def test_inference_artifact_matches_calculator(data_dir, tmp_path):
    # One MoE block (experts plus a shared expert) keeps the trace short; more blocks repeat the same code.
    model_file = matris.save(tiny_model(data_dir, seed=5, num_blocks=1, moe_blocks=[0]), tmp_path / "m.st")
    model = matris.load(model_file)
    path = write_artifact(model, tmp_path / "model.pt2", source=model_file)
    program, meta = load_artifact(path)
    assert (
        meta["tasks"] == TASKS and meta["cutoff"] == model.config.cutoff and meta["source"] == str(model_file)
    )
    deployed = {task: DeployedCalculator((program, meta), task=task) for task in TASKS}

    structures = list(iter_atoms(data_dir, split="val"))[:6]
    copper = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 3)  # sizes unlike the traced example
    copper.rattle(0.05, seed=3)
    copper.info["task"] = "crystal-pbe"
    for atoms in [*structures, copper]:
        task = atoms.info["task"]
        a, b = atoms.copy(), atoms.copy()
        a.info.update(atoms.info)
        b.info.update(atoms.info)
        a.calc, b.calc = MatRISCalculator(model, task=task), deployed[task]
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=2e-4)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=2e-5, rtol=0)
        if atoms.pbc.all():
            np.testing.assert_allclose(b.get_stress(), a.get_stress(), atol=1e-6, rtol=0)


def test_export_loads_in_a_process_with_only_matris(model_file, tmp_path):
    check = (
        "import sys, matris\n"
        f"model = matris.load({str(model_file)!r})\n"
        "bad = sorted({'janus', 'parsl', 'h5py', 'data_prep'} & set(sys.modules))\n"
        "assert not bad, bad\n"
        "print(model.config.tasks)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "crystal-pbe" in result.stdout


class _Pull(Calculator):
    """Energy ½k·Σ|r_i - c|² toward the cell's centre: every atom falls slowly onto the others."""

    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        offset = self.atoms.positions - self.atoms.positions.mean(axis=0)
        self.results = {"energy": 0.025 * float((offset**2).sum()), "forces": -0.05 * offset}


class _Push(Calculator):
    """A constant force and no energy: not conservative, so the total energy climbs."""

    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        forces = np.zeros((len(self.atoms), 3))
        forces[::2, 0], forces[1::2, 0] = 0.05, -0.05
        self.results = {"energy": 0.0, "forces": forces}


def test_md_calls_a_collapsing_cell_unstable_and_names_the_bound():
    """A Li cell whose atoms fall together keeps conserving energy; the closest-pair floor (a fraction of
    the starting closest pair) catches it. A non-conservative surface fails the drift bound."""
    from evaluation.md import CLOSEST_PAIR_FLOOR, MAX_DRIFT_MEV_PER_ATOM_PS, run_nve

    cell = bulk("Li", "bcc", a=3.44, cubic=True).repeat((1, 1, 3))
    collapsed = run_nve(cell, _Pull(), "crystal", steps=200)
    assert not collapsed.stable and "closest pair" in collapsed.reason, collapsed
    assert collapsed.closest_pair_floor_a == pytest.approx(CLOSEST_PAIR_FLOOR * 3.44 * 3**0.5 / 2, rel=1e-6)
    assert collapsed.min_distance_a < collapsed.closest_pair_floor_a
    drifting = run_nve(cell, _Push(), "crystal", steps=100)
    assert not drifting.stable and "drift" in drifting.reason, drifting
    assert abs(drifting.drift_mev_per_atom_per_ps) > MAX_DRIFT_MEV_PER_ATOM_PS


def test_unseen_elements_are_counted_and_warned_about(data_dir, model_file):
    """A held-out structure with an element its task never trained on: the calculator warns once, and
    the evaluation counts it."""
    from evaluation.evaluate import score
    from matris.calculator import UnseenElementWarning

    model = matris.load(model_file)
    trained = model.trained_elements("crystal-pbe")
    assert trained and 94 not in trained  # plutonium: in no training split
    calc = MatRISCalculator(model, task="crystal-pbe")
    atoms = bulk("Cu", "fcc", a=3.6).repeat(2)
    atoms.numbers[0] = 94
    with pytest.warns(UnseenElementWarning, match="Pu"):
        calc.get_potential_energy(atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnseenElementWarning)  # once per element
        atoms.positions[1] += 0.01
        calc.get_potential_energy(atoms)
    from data_prep.loader import GraphDataset

    dataset = GraphDataset(data_dir, split="val")
    graphs = {i: dataset[i] for i in range(len(dataset))}
    first = next(i for i, g in graphs.items() if dataset.tasks[g.task] == "crystal-pbe")
    graphs[first].atomic_numbers[0] = 94
    tasks, _ = score(model, model_file, graphs, dataset.tasks, dataset.sizes, 2048)
    assert tasks["crystal-pbe"]["n_unseen_elements"] >= 1
    assert tasks["molecule-gfn2"]["force_zero_mae_mev_per_a"] > 0
