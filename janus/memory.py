"""Memory of one training rank: sharded state, the gathered step state, activations and halo, in bytes.

`python -m janus.memory calibrate --preset NAME [--site SITE]` measures the activation coefficients of a
preset on the machine at hand and stores them in ``site_configs/calibration/SITE.json`` (one entry per
preset); `janus.layout` reads them to plan layouts and batch budgets.

The step keeps every parameter gathered and every gradient local from the forward to the end of the loss
backward (`janus.parallel.step_phase`), so the peak of a rank, reached in the loss backward, holds

* its FSDP shards of the parameters and the two AdamW moments: ``3 P / world``;
* the gathered parameters and their local gradients: the dense ones whole, the experts' ``1 / expert``
  share (FSDP gathers the expert shards over the ``(dp, graph)`` ranks);
* with expert sharding, the weights each MoE layer receives for the pieces the planner gives the rank, and
  their gradients: about one ``1 / expert`` share again;
* activations, linear in the atoms (owned and ghost), edges and triplets the rank holds, per block:
  ``blocks · (a · atoms + b · edges + c · triplets) + const``, with coefficients measured by the
  calibration (the dense and the MoE feed-forward widths, top-K and the line graph all enter them);
* the graph group's halo: ghost rows exchanged twice per block, kept for both backward passes.

Peak memory on CPU is the process's anonymous resident set (``VmHWM − RssFile − RssShmem`` after the
high-water mark is reset through ``/proc/self/clear_refs``), with glibc told to map every allocation
over 128 KiB on its own (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the resident set at once; on
a GPU it is the caching allocator's ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from janus.config import ParallelConfig
from matris.config import ModelConfig

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "site_configs" / "calibration"
MMAP_THRESHOLD = "131072"  # glibc: allocations above this get their own mapping, returned on free
GIB = 1024**3


# -- parameters and the state they carry -----------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """Dense (everything but the routed experts) and expert parameter counts of a model."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def parameter_counts(model: ModelConfig) -> ParameterCounts:
    """Counted on the meta device: no memory, any size."""
    from matris import MatRIS
    from matris.moe import Experts

    with torch.device("meta"):
        net = MatRIS(model)
    expert = sum(p.numel() for m in net.modules() if isinstance(m, Experts) for p in m.parameters())
    total = sum(p.numel() for p in net.parameters())
    return ParameterCounts(dense=total - expert, expert=expert)


@dataclass(frozen=True)
class RankWork:
    """What one rank computes in a step: atoms (owned and ghosts), edges and line-graph triplets."""

    atoms: float
    edges: float
    triplets: float
    ghosts: float = 0.0


class Calibration(BaseModel):
    """Activation bytes of a preset: ``blocks · (per_atom · atoms + per_edge · edges + per_triplet ·
    triplets) + constant``, measured by ``python -m janus.memory calibrate``."""

    model_config = ConfigDict(extra="forbid")

    preset: str
    per_atom: float = Field(ge=0)
    per_edge: float = Field(ge=0)
    per_triplet: float = Field(ge=0)
    constant: float = Field(ge=0)
    dtype: str = "float32"
    kernels: str = Field(description="'compiled' (`matris.fused`) or 'plain' ops (MATRIS_COMPILE=0)")
    device: str = Field(description="where it was measured, e.g. 'cpu' or the GPU's name")
    method: str
    measured_with: dict = Field(description="the reduced model the coefficients were fitted on")
    points: int = Field(ge=1)
    worst_fit_error: float = Field(description="largest relative residual, batches ≥ 10 % of the largest")
    date: str
    command: str

    def activations(self, work: RankWork, blocks: int) -> float:
        per_block = self.per_atom * work.atoms + self.per_edge * work.edges + self.per_triplet * work.triplets
        return blocks * per_block + self.constant


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one rank at its peak (the loss backward), by component."""

    parameters: float  # FSDP shards of the parameters
    optimizer: float  # AdamW moments of those shards
    gathered: float  # parameters gathered for the step (dense whole, experts' 1/expert share)
    gradients: float  # their local gradients until the reduce-scatter
    expert_pieces: float  # expert weights received for this rank's pieces, and their gradients
    activations: float
    halo: float

    @property
    def state(self) -> float:
        return self.parameters + self.optimizer + self.gathered + self.gradients + self.expert_pieces

    @property
    def total(self) -> float:
        return self.state + self.activations + self.halo

    def components(self) -> dict[str, float]:
        return {
            "parameters (shard)": self.parameters,
            "AdamW moments (shard)": self.optimizer,
            "gathered parameters": self.gathered,
            "local gradients": self.gradients,
            "expert pieces": self.expert_pieces,
            "activations": self.activations,
            "halo": self.halo,
        }


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float64": 8}[dtype]


def state_bytes(counts: ParameterCounts, parallel: ParallelConfig, dtype: str) -> dict[str, float]:
    """Parameter, optimizer and gradient bytes of one rank under ``parallel`` (see the module docstring)."""
    size, world, expert = dtype_bytes(dtype), parallel.world_size, parallel.expert
    # an expert shard with no (dp, graph) ranks to share it is not wrapped by FSDP: computed in place
    expert_copy = counts.expert / expert if expert == 1 or parallel.dp * parallel.graph > 1 else 0.0
    return {
        "parameters": size * counts.total / world,
        "optimizer": 2 * size * counts.total / world,
        "gathered": size * (counts.dense + expert_copy),
        "gradients": size * (counts.dense + counts.expert / expert),
        "expert_pieces": 2 * size * counts.expert / expert if expert > 1 else 0.0,
    }


def halo_bytes(ghosts: float, model: ModelConfig, dtype: str) -> float:
    """Ghost rows refreshed twice per block, the rows sent for them as many times, each kept for the force
    and the loss backward."""
    return 2 * 2 * 2 * model.num_blocks * ghosts * model.dim * dtype_bytes(dtype)


def estimate(
    model: ModelConfig,
    parallel: ParallelConfig,
    work: RankWork,
    calibration: Calibration,
    dtype: str = "float32",
    counts: ParameterCounts | None = None,
) -> MemoryEstimate:
    counts = counts or parameter_counts(model)
    return MemoryEstimate(
        **state_bytes(counts, parallel, dtype),
        activations=calibration.activations(work, model.num_blocks),
        halo=halo_bytes(work.ghosts, model, dtype) if parallel.graph > 1 else 0.0,
    )


# -- measuring peak memory -------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakMemory:
    """Peak bytes this process allocates between `reset` and `peak` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
            raise RuntimeError(
                f"peak CPU memory needs MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in the environment "
                "from the start of the process (freed tensors otherwise stay resident)"
            )

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _status()["RssAnon"]

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        s = _status()
        return s["VmHWM"] - s["RssFile"] - s.get("RssShmem", 0)

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return f"VmHWM - RssFile - RssShmem after clear_refs 5, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"


def measurement_env() -> dict[str, str]:
    """The environment a measuring process must start with."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": "1"}


# -- calibration -----------------------------------------------------------------------------------------

CALIBRATION_MODELS: dict[str, dict] = {
    # Full depth where the preset fits a shared 24 GB machine; the billion-parameter presets keep their
    # widths, top-K and shared experts, with fewer blocks and experts (activations grow per block; the
    # expert count only sizes the parameters, which the state model counts exactly).
    "tiny": {},
    "matris-6l": {},
    "moe-s": {"num_blocks": 2, "moe_blocks": [0, 1], "num_experts": 8},
    "moe-m": {"num_blocks": 1, "moe_blocks": [0], "num_experts": 8},
    "moe-l": {"num_blocks": 1, "moe_blocks": [0], "num_experts": 16},
}


def calibration_file(site: str, folder: Path = CALIBRATION_DIR) -> Path:
    return folder / f"{site}.json"


def load_calibrations(site: str, folder: Path = CALIBRATION_DIR) -> dict[str, Calibration]:
    """The calibrations stored for ``site`` (empty when none were measured there)."""
    path = calibration_file(site, folder)
    if not path.is_file():
        return {}
    return {name: Calibration.model_validate(entry) for name, entry in json.loads(path.read_text()).items()}


def store_calibration(site: str, calibration: Calibration, folder: Path = CALIBRATION_DIR) -> Path:
    from matris.io import write_atomic

    path = calibration_file(site, folder)
    entries = {name: c.model_dump(mode="json") for name, c in load_calibrations(site, folder).items()}
    entries[calibration.preset] = calibration.model_dump(mode="json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(entries, indent=1, sort_keys=True) + "\n").encode())
    return path


def calibration_batches(sizes: np.ndarray, targets: list[int], seed: int = 0) -> list[list[int]]:
    """Batches of about ``targets`` atoms each of three kinds, so atoms, edges and triplets vary apart:
    the sparsest structures (fewest triplets per atom), the densest, and a random mix."""
    density = sizes[:, 2] / np.maximum(sizes[:, 0], 1)
    order = np.argsort(density, kind="stable")
    half = len(order) // 2
    kinds = [order[:half], order[half:][::-1], np.random.default_rng(seed).permutation(len(order))]
    batches = []
    for target in targets:
        for pool in kinds:
            picked, atoms = [], 0
            for i in pool:
                if atoms >= target:
                    break
                picked.append(int(i))
                atoms += int(sizes[i, 0])
            batches.append(picked)
    return batches


def measure_point(model, dataset, indices: list[int], meter: PeakMemory, dtype: torch.dtype) -> int:
    """Peak bytes above the step's start of one training step's compute, gradients excluded."""
    from janus.batching import loss_batch
    from matris import predict
    from matris.batch import collate
    from matris.loss import multitask_loss
    from matris.properties import parameter_backward

    graphs = [dataset[i] for i in indices]
    batch = collate(graphs, dtype=dtype).to(meter.device)
    labels = loss_batch(graphs, dtype, meter.device, model.config.magmom_head)
    model.zero_grad(set_to_none=True)
    before = meter.current()
    meter.reset()
    pred = predict(model, batch, training=True)
    loss, _ = multitask_loss(pred, labels, model.config.tasks, None, None, active=True)
    parameter_backward(loss, model)
    peak = meter.peak() - before
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    del pred, loss, batch, labels
    model.zero_grad(set_to_none=True)
    return peak - grads


def calibrate(
    preset: str, data_dir: Path, largest_atoms: int, device: torch.device, dtype: str = "float32"
) -> Calibration:
    """Fit the activation coefficients of ``preset`` (reduced as in `CALIBRATION_MODELS`) on batches of
    up to ``largest_atoms`` atoms drawn from ``data_dir``."""
    from data_prep.loader import GraphDataset
    from matris import MatRIS

    meter = PeakMemory(device)
    dataset = GraphDataset(data_dir, split=None)
    reduced = CALIBRATION_MODELS.get(preset, {})
    config = ModelConfig.from_preset(preset, tasks=dataset.tasks, **reduced)
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    torch.manual_seed(0)
    model = MatRIS(config).to(device=device, dtype=torch_dtype)
    targets = [largest_atoms // 4, largest_atoms // 2, largest_atoms]
    batches = calibration_batches(dataset.sizes, targets)
    measure_point(model, dataset, batches[0], meter, torch_dtype)  # warm-up: lazy initialisation
    rows, measured = [], []
    for indices in batches:
        atoms, edges, triplets = dataset.sizes[indices].sum(axis=0).tolist()
        rows.append([config.num_blocks * atoms, config.num_blocks * edges, config.num_blocks * triplets, 1.0])
        measured.append(measure_point(model, dataset, indices, meter, torch_dtype))
    from scipy.optimize import nnls

    a, y = np.asarray(rows, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    coef, _ = nnls(a, y)  # absolute residuals: the large batches, which decide what fits, weigh most
    large = y >= 0.1 * y.max()  # below, resident-set noise of a few MB dominates
    worst = float(np.max(np.abs(a @ coef - y)[large] / y[large]))
    from matris import fused

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kernels = "compiled" if fused.available() else "plain"
    return Calibration(
        preset=preset, per_atom=coef[0], per_edge=coef[1], per_triplet=coef[2], constant=coef[3],
        dtype=dtype, kernels=kernels, device=name, method=meter.method, measured_with=reduced, points=len(y),
        worst_fit_error=worst, date=datetime.date.today().isoformat(),
        command=f"{'' if kernels == 'compiled' else 'MATRIS_COMPILE=0 '}python -m janus.memory calibrate "
        f"--preset {preset} --largest-atoms {largest_atoms}",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m janus.memory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="measure a preset's activation coefficients here and store them")
    cal.add_argument("--preset", required=True)
    cal.add_argument("--data", type=Path, required=True, help="a prepared data directory (manifest.json)")
    cal.add_argument("--site", default="local", help="the site this machine is (names the stored file)")
    cal.add_argument("--largest-atoms", type=int, default=2048, help="atoms of the largest batch measured")
    cal.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    cal.add_argument("--dir", type=Path, default=CALIBRATION_DIR, help="where the site files are kept")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        command = [sys.executable, "-m", "janus.memory", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(command, env=measurement_env(), check=False).returncode
    torch.set_num_threads(1)
    result = calibrate(args.preset, args.data, args.largest_atoms, device, args.dtype)
    path = store_calibration(args.site, result, args.dir)
    print(json.dumps(result.model_dump(mode="json"), indent=1))
    print(f"stored in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
