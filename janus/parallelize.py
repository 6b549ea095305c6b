"""Everything the trainer applies to the single-device model, in one place and in order (torchtitan's
``parallelize``): the kernel choice (``train.kernels``), expert sharding, the experts this rank stores,
the device, graph sharding's ghost refresh, and FSDP. `matris.MatRIS` itself reads as one-device code."""

from __future__ import annotations

import torch
from torch import nn

from janus.config import JanusConfig
from janus.expert_parallel import parallelize_moe
from janus.graph_parallel import install_hooks
from janus.parallel import Meshes, StepContext, apply_fsdp
from matris.fused import select_kernels
from matris.moe import materialize_experts


def parallelize(
    model: nn.Module, cfg: JanusConfig, meshes: Meshes, ctx: StepContext, device: torch.device
) -> nn.Module:
    """``model``, built under `matris.moe.deferred_experts` (no expert weights yet), made ready to train
    on this rank; ``ctx`` is the per-step state the sharding wrappers read."""
    select_kernels(cfg.train.kernels)
    expert, graph = cfg.parallel.expert, cfg.parallel.graph
    if graph > 1 or expert > 1:
        parallelize_moe(model, ctx, meshes.mesh["expert"] if expert > 1 else None)
    materialize_experts(model)  # each rank allocates only the experts it stores
    model = model.to(device)
    if graph > 1:
        install_hooks(model, ctx)
    return apply_fsdp(model, meshes)
