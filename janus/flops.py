"""FLOPs of training steps and the peak they are compared with (``flop_efficiency`` in metrics.jsonl).

Counting every step's matmuls with the formulas of `torch.utils.flop_counter` slows it down, and batch
shapes change every step, so `FlopMeter` counts a few steps exactly (the first two, then every
``every``-th: all three phases, on every rank, summed) and scales an analytic count in between: the
matmul FLOPs of one forward as a function of atoms n, edges e and line-graph triplets t
(`forward_flops`, the straightforward per-edge/per-triplet evaluation) times the ratio of a training
step to its forward (`STEP_OVER_FORWARD`), multiplied by the last measured/analytic ratio. The ratio
absorbs how the model's implementation evaluates the same function (fused projections, padded dense
line-graph blocks, expert capacity padding), so the figure follows what the device actually executes.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from matris.config import ModelConfig
from matris.graph import StructureGraph
from matris.graph import count_triplets as graph_triplets

# training step / forward matmul FLOPs measured with matris.flops.model_flops (tiny and matris-6l: 5.98)
STEP_OVER_FORWARD = 6.0

# Dense fp32 peak (non-tensor-core) per device, FLOP/s, by a substring of torch.cuda.get_device_name().
FP32_PEAK = {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "MI250X": 47.9e12, "MI300X": 163.4e12}


def forward_flops(config: ModelConfig, atoms: int, edges: int, triplets: int, structures: int = 1) -> float:
    """Matmul FLOPs of one forward pass."""
    d, z = config.dim, config.max_z + 1
    total = 2 * structures * (z * d + 2 * d + d * d)  # composition and charge/spin embeddings
    total += 2 * edges * config.num_radial * d  # bond embedding
    for i in range(config.num_blocks):
        if i in config.moe_blocks:
            ffn = 6 * d * config.expert_hidden * (config.top_k + config.num_shared_experts)
        else:
            ffn = 6 * d * config.mlp_hidden
        total += 30 * edges * d * d  # bond refinement 14, line attention q/k/v/out 8, atom attention k/v 8
        total += 4 * triplets * config.num_angular * d  # angle projections of the line attention
        total += atoms * (4 * d * d + 2 * ffn)  # atom attention q/out, two feed-forward layers
    heads = 2 if config.magmom_head else 1
    return float(total + heads * 2 * atoms * (d * d + d))


def step_flops(config: ModelConfig, atoms: int, edges: int, triplets: int, structures: int = 1) -> float:
    return STEP_OVER_FORWARD * forward_flops(config, atoms, edges, triplets, structures)


class MatmulFlops(TorchDispatchMode):
    """Matmul FLOPs of everything run inside it, with the formulas of `torch.utils.flop_counter` but
    without its module tracking (whose backward hooks do not support ``autograd.grad`` on leaves)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class FlopMeter:
    """Training-step FLOPs: counted on calibration steps, estimated (calibrated analytic) on the others."""

    def __init__(self, config: ModelConfig, every: int = 100):
        self.config, self.every = config, every
        self.ratio = 1.0  # measured / analytic, from the last counted step
        self._counter: MatmulFlops | None = None

    def counts(self, step: int) -> bool:
        """Whether ``step`` is counted exactly (the same answer on every rank)."""
        return step < 2 or step % self.every == 0

    def counting(self, step: int) -> AbstractContextManager:
        """Context for the step's forward and backward passes: a FLOP counter on counted steps."""
        self._counter = MatmulFlops() if self.counts(step) else None
        return self._counter if self._counter is not None else nullcontext()

    def measured(self) -> float | None:
        """This rank's counted FLOPs of the last step, or None if it was not counted."""
        return float(self._counter.total) if self._counter is not None else None

    def estimate(self, atoms: int, edges: int, triplets: int, structures: int) -> float:
        return self.ratio * step_flops(self.config, atoms, edges, triplets, structures)

    def calibrate(self, measured: float, atoms: int, edges: int, triplets: int, structures: int) -> None:
        analytic = step_flops(self.config, atoms, edges, triplets, structures)
        if measured > 0 and analytic > 0:
            self.ratio = measured / analytic


def count_triplets(graph: StructureGraph, cutoff: float) -> int:
    """The model's line-graph size for ``graph`` (`matris.graph.count_triplets` on its bond lengths)."""
    centre, neighbour = graph.edge_index
    vector = graph.positions[neighbour] + graph.edge_shift @ graph.cell - graph.positions[centre]
    return graph_triplets(centre, np.linalg.norm(vector, axis=1), graph.n_atoms, cutoff)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s of one rank's device: a table for known accelerators, else a short matmul measurement."""
    return table_peak_flops(device, dtype) or measured_matmul_flops(device, dtype)


def table_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    """The device's ``FP32_PEAK`` entry (halved for float64); None for CPUs and accelerators not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((value for key, value in FP32_PEAK.items() if key in name), None)
    return peak and peak * (0.5 if dtype == torch.float64 else 1.0)


def measured_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024
) -> float:
    """Best of a few square matmuls: an attainable peak for CPUs and unknown devices."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        _synchronize(device)
        tic = time.perf_counter()
        a @ a
        _synchronize(device)
        best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
