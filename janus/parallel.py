"""Parallelism applied to a single-device MatRIS model from outside: device mesh and FSDP2.

Training an interatomic potential differentiates twice (forces by `autograd.grad(create_graph=True)`,
then the loss), which FSDP2 does not support out of the box (pytorch issue 172543: parameters are freed
after the first backward). `force_phase` is the recipe verified in DESIGN.md: keep parameters gathered and
gradients local through the forward and the force backward, then let the loss backward reduce-scatter and
reshard. Parameters are therefore gathered once per step and reduced once per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from janus.config import ParallelConfig

MESH_DIMS = ("dp", "graph", "expert")


class LayoutError(ValueError):
    """The parallel layout does not fit the world size."""


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    if parallel.world_size != world_size:
        raise LayoutError(
            f"parallel.dp × parallel.graph × parallel.expert = {parallel.dp} × {parallel.graph} × "
            f"{parallel.expert} = {parallel.world_size}, but {world_size} ranks were launched"
        )
    shape = (parallel.dp, parallel.graph, parallel.expert)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard each interaction block, then the rest (embeddings, readout) at the root.

    Each rank's loss is its share of the global loss (statistics are reduced across ranks inside the
    loss), so gradients are summed over ranks, not averaged: divide factor 1, with plain SUM collectives
    (FSDP would otherwise use PREMUL_SUM, which gloo lacks).
    """
    dp_mesh = mesh["dp"]
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False)
    for module in (*model.blocks, model):  # the settings are per FSDP module, not inherited
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


@contextmanager
def force_phase(model: nn.Module) -> Iterator[None]:
    """Forward and force/stress backward with parameters kept gathered and no gradient reduction."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_backward(False)
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_reshard_after_backward(True)
        model.set_requires_gradient_sync(True)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. a gradient norm) or the tensor itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
