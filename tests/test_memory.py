"""Memory model, calibration and layout planner (`janus.memory`, `janus.layout`, `workflows.plan`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from janus import layout, memory
from janus.config import ParallelConfig
from matris.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
GIB = memory.GIB
CAL = memory.Calibration(
    preset="x", per_atom=0.0, per_edge=4000.0, per_triplet=250.0, constant=0.0, kernels="plain", device="cpu",
    method="test", measured_with={}, points=3, worst_fit_error=0.0, date="2026-12-07", command="test",
)  # fmt: skip
SAMPLE = layout.DataProfile(1176, 74582, 343960, 46.6, 248.0, "test")


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    """The bundled crystals and molecules, prepared."""
    out = tmp_path_factory.mktemp("data") / "small"
    inputs = [ROOT / "sample_data" / f"{name}.extxyz.gz" for name in ("crystals_pbe", "molecules_gfn2")]
    cmd = [sys.executable, "-m", "data_prep", *map(str, inputs), "--out", str(out), "--val-fraction", "0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=300)
    return out


def test_parameter_counts_split_experts_from_the_rest() -> None:
    from matris import MatRIS

    config = ModelConfig.from_preset("tiny")
    counts = memory.parameter_counts(config)
    assert counts.total == sum(p.numel() for p in MatRIS(config).parameters())
    blocks, experts, d, h = 2, 4, 32, 32
    assert counts.expert == blocks * 2 * experts * 3 * d * h  # two MoE layers of w1, w3, w2 per block
    assert memory.parameter_counts(ModelConfig.from_preset("matris-6l")).expert == 0


def test_state_is_sharded_over_all_ranks_and_gathered_per_expert_group() -> None:
    counts = memory.ParameterCounts(dense=1000, expert=8000)
    one = memory.state_bytes(counts, ParallelConfig(), "float32")
    four = memory.state_bytes(counts, ParallelConfig(dp=2, expert=2), "float32")
    assert one["parameters"] == 4 * 9000 and one["optimizer"] == 8 * 9000 and one["expert_pieces"] == 0
    assert four["parameters"] == 9000 and four["gathered"] == 4 * (1000 + 4000)
    assert four["expert_pieces"] == 2 * 4 * 4000
    in_place = memory.state_bytes(counts, ParallelConfig(expert=2), "float32")  # no FSDP over the shard
    assert in_place["gathered"] == 4 * 1000 and in_place["gradients"] == 4 * (1000 + 4000)


def test_peak_memory_sees_a_tensor_allocated_and_freed(tmp_path: Path) -> None:
    """The CPU method catches an allocation that is gone again by the time the peak is read."""
    code = (
        "import torch; from janus.memory import PeakMemory; m = PeakMemory(torch.device('cpu'));"
        "x = torch.ones(1); m.reset(); before = m.current(); y = torch.ones(50_000_000); del y;"
        "print(m.peak() - before, m.current() - before)"
    )
    env = memory.measurement_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    peak, after = (int(v) for v in out.stdout.split())
    assert abs(peak - 200e6) < 0.02 * 200e6 and after < 5e6


def test_calibrate_command_fits_and_stores_coefficients(sample_data: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "janus.memory", "calibrate", "--preset", "tiny", "--data", str(sample_data),
           "--site", "test", "--largest-atoms", "96", "--dir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MATRIS_COMPILE": "0"}
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
    stored = memory.load_calibrations("test", tmp_path)["tiny"]
    assert stored.points == 9 and stored.device == "cpu" and "VmHWM" in stored.method
    assert stored.per_edge + stored.per_triplet > 0 and stored.worst_fit_error < 0.5


def test_layouts_respect_the_experts() -> None:
    tiny = ModelConfig.from_preset("tiny")  # 4 experts
    found = {(p.dp, p.graph, p.expert) for p in layout.layouts(8, tiny)}
    assert (1, 2, 4) in found and (8, 1, 1) in found and not any(e == 8 for _, _, e in found)
    assert all(p.expert == 1 for p in layout.layouts(4, ModelConfig.from_preset("matris-6l")))


def test_ghosts_grow_relative_to_the_part_and_stay_below_the_structure() -> None:
    one, two, eight = (layout.ghost_atoms(10_000, 600_000, 6.0, g) for g in (1, 2, 8))
    assert one == 0 and 0 < two / 5000 < eight / 1250
    assert layout.ghost_atoms(100, 6000, 6.0, 8) <= 100 * 7 / 8


def test_planner_prefers_no_graph_sharding_when_the_structure_fits() -> None:
    plan = layout.plan_layout(ModelConfig.from_preset("tiny"), 4, 16 * GIB, SAMPLE, CAL)
    assert plan.parallel.graph == 1 and plan.memory.total <= layout.usable(16 * GIB)
    assert plan.largest_structure_atoms > SAMPLE.largest_atoms and "graph=1" in " ".join(plan.reasons)


def test_planner_cuts_a_structure_too_large_for_one_rank() -> None:
    big = layout.DataProfile(20_000, 1_000_000, 5_000_000, 50.0, 250.0, "test")
    plan = layout.plan_layout(ModelConfig.from_preset("matris-6l"), 8, 8 * GIB, big, CAL)
    assert plan.parallel.graph > 1 and "narrower graph group" in " ".join(plan.reasons)
    with pytest.raises(layout.PlanError, match="largest structure"):
        layout.plan_layout(ModelConfig.from_preset("matris-6l"), 1, 8 * GIB, big, CAL)


def test_a_billion_parameters_do_not_fit_one_16_gib_rank() -> None:
    moe_s = ModelConfig.from_preset("moe-s")
    with pytest.raises(layout.PlanError, match="parameters, gradients and AdamW state alone"):
        layout.plan_layout(moe_s, 1, 16 * GIB, SAMPLE, CAL)
    nodes = layout.smallest_ranks(moe_s, 8, 64 * GIB, SAMPLE, CAL)
    assert nodes is not None and nodes >= 1
    layout.plan_layout(moe_s, nodes * 8, 64 * GIB, SAMPLE, CAL)
    if nodes > 1:
        with pytest.raises(layout.PlanError):
            layout.plan_layout(moe_s, (nodes - 1) * 8, 64 * GIB, SAMPLE, CAL)


def parsl_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "workflows.cli", str(ROOT / "workflows" / "pretrain.py"), *args]
    env = {"PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(cwd / "config"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)


def test_asking_for_nodes_is_enough_on_frontier(tmp_path: Path) -> None:
    out = parsl_run("--site", "frontier", "--set", "site.account=A", "--set", "launch.nodes=64",
                    "--set", "model.preset=moe-l", "--dry-run", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "64 node(s) × 8 rank(s) = 512 ranks" in text and "(planned)" in text
    assert "#SBATCH --nodes=64" in text and "AdamW moments" in text and "64.0 GiB" in text
    line = next(x for x in text.splitlines() if x.startswith("layout plan:"))
    dp, graph, expert = (int(line.split(f"{k}=")[1].split()[0]) for k in ("dp", "graph", "expert"))
    assert dp * graph * expert == 512 and 64 % expert == 0


def test_impossible_request_names_the_smallest_node_count(tmp_path: Path) -> None:
    out = parsl_run("--site", "frontier", "--set", "site.account=A", "--set", "launch.nodes=1",
                    "--set", "model.preset=moe-l", "--dry-run", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "no layout of 8 rank(s) fits" in out.stderr
    assert "smallest node count that fits is" in out.stderr and "GiB" in out.stderr


def test_explicit_layout_is_still_checked_against_memory(tmp_path: Path) -> None:
    out = parsl_run("--site", "frontier", "--set", "site.account=A", "--set", "launch.nodes=64",
                    "--set", "model.preset=moe-l", "--set", "parallel.dp=512", "--dry-run",
                    cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "dp=512 graph=1 expert=1" in out.stderr


def test_data_profile_reads_the_prepared_data(sample_data: Path) -> None:
    profile = layout.DataProfile.from_data_dir(sample_data)
    manifest = json.loads((sample_data / "manifest.json").read_text())
    assert profile.largest_atoms >= 1 and profile.edges_per_atom > 0 and manifest["n_structures"] >= 1
    sizes = np.array([[10, 100, 1000], [20, 50, 10]])
    assert layout.DataProfile.from_sizes(sizes, "x").largest_edges == 100


def test_scaling_ladder_plans_every_rung(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "workflows.cli", str(ROOT / "workflows" / "scaling.py"),
           "--site", "frontier", "--set", "site.account=A", "--set", "model.preset=moe-l",
           "--set", "scaling.nodes=[32,64]", "--set", "scaling.modes=[weak]", "--dry-run"]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    rungs = [line for line in out.stdout.splitlines() if line.strip().startswith("weak-n")]
    assert len(rungs) == 2 and all("(planned)" in line for line in rungs)
    for line, ranks in zip(rungs, (256, 512), strict=True):
        sizes = (line.split(f"{k}=")[1].split()[0].rstrip(",") for k in ("dp", "graph", "expert"))
        dp, graph, expert = (int(v) for v in sizes)
        assert dp * graph * expert == ranks
