"""Parallelism applied to a single-device MatRIS model from outside: device mesh, FSDP2, collectives.

The mesh has three named dims ``(dp, graph, expert)``. Every rank holds distinct data (expert-parallel
ranks are data-parallel for everything but the experts; graph ranks hold parts of one structure or
distinct small ones), and each rank's loss is its *share* of the global loss, so every gradient is a sum
over ranks: non-expert parameters are sharded by FSDP over all ranks and reduce-scattered with SUM;
expert weights are sharded over ``expert`` (FSEP, `janus.expert_parallel`), and FSDP shards those
shards further over the flattened ``(dp, graph)`` dims.

Training an interatomic potential differentiates twice: forces by `autograd.grad(create_graph=True)`
(pass 1), then the loss (pass 2). FSDP2 does not support that out of the box (pytorch issue 172543:
parameters are freed after the first backward), and its hook-driven reduce-scatter would in any case fire
per module *during* pass 2, when a block's parameter gradients from the double-backward graph may not
have arrived yet; with a data-dependent autograd graph (MatRIS buckets its line graph by degree) ranks
would then reduce different sets of gradients in different orders. `step_phase` therefore keeps
parameters gathered and gradients local through the forward and both backward passes (parameters are
gathered once per step), and `reduce_gradients` then reduce-scatters every FSDP group once, complete,
in module order, and reshards.

The differentiable collectives inside the model (ghost exchange, expert token dispatch) must also run
in the same order on every rank in both passes, whatever the local graph looks like. Their inputs form
one chain (each depends on the previous one's output), which orders them in each pass by data
dependencies alone; `exchange` links each output to its pass-1 backward so that, in pass 2, the double
backward of all pass-1 exchanges completes before the forward exchanges are differentiated. What could
not join the chain leaves autograd: expert weights and ghost positions move with plain collectives
(`transfer`) in the forward, and their gradients come back after the loss backward, in program order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate

from janus.config import LayoutError, ParallelConfig

MESH_DIMS = ("dp", "graph", "expert")


@dataclass
class Meshes:
    """The device mesh and the sub-meshes and process groups the trainer uses."""

    mesh: DeviceMesh
    world: DeviceMesh  # all ranks flattened: FSDP of non-expert parameters, loss statistics
    dp_graph: DeviceMesh  # (dp, graph) flattened: FSDP of the expert shards

    def size(self, dim: str) -> int:
        return self.mesh[dim].size()

    def rank(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank()

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh[dim].get_group()


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str) -> Meshes:
    if parallel.world_size != world_size:
        raise LayoutError(
            f"parallel.dp × parallel.graph × parallel.expert = {parallel.dp} × {parallel.graph} × "
            f"{parallel.expert} = {parallel.world_size}, but {world_size} ranks were launched"
        )
    shape = (parallel.dp, parallel.graph, parallel.expert)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    return Meshes(mesh=mesh, world=mesh._flatten("world"), dp_graph=mesh["dp", "graph"]._flatten("dp_graph"))


@dataclass
class StepContext:
    """Per-step state that the sharding wrappers installed in the model read during its forward.

    ``n_owned``: atoms ``[0, n_owned)`` of the model's input are this rank's own, the rest are ghosts
    (graph sharding). ``halo``: the ghost exchange (`janus.graph_parallel.Halo`). ``composition``: the
    full structures' element fractions (a partitioned structure's local atoms are only part of it).
    ``histograms``: owned-atom element histograms of every rank of the expert group, read by the planner.
    ``plans``: the expert plans made during the forward (for metrics). ``pending``: gathered expert
    weights whose gradients go back to the ranks storing them after the backward. ``bytes``: volume
    of the exchanges, by kind (for the benchmark).
    """

    n_owned: int | None = None
    halo: Any = None
    composition: torch.Tensor | None = None
    histograms: np.ndarray | None = None
    plans: list[Any] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.plans.clear()
        self.pending.clear()
        self.bytes.clear()

    def count(self, kind: str, tensor: torch.Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Rows of ``x`` scattered to the group (``in_splits`` rows to each rank), twice differentiable."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return funcol.wait_tensor(out)


def exchange(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """`all_to_all` for the exchanges inside the model's forward, linked for pass-2 ordering (module
    docstring): differentiated in pass 1 and again in pass 2, they must keep one order on every rank."""
    return _AfterDoubleBackward.apply(all_to_all(x, out_splits, in_splits, group))


def transfer(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Rows of ``x`` scattered to the group, outside autograd (parameters, gradients, positions)."""
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.detach().contiguous(), out_splits, in_splits, group=group)
    return out


class _AfterDoubleBackward(torch.autograd.Function):
    """Identity whose backward adds ``0 · output``: in pass 2 the gradient of the output then also waits
    for the double backward of the collective's pass-1 backward (an exact zero otherwise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.add(grad, x, alpha=0)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over the group, differentiable (its backward is a sum of the incoming gradients)."""
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))


def expert_stores(model: nn.Module) -> list[nn.Module]:
    """The modules holding expert-sharded weights (`janus.expert_parallel.ExpertShard`)."""
    from janus.expert_parallel import ExpertShard

    return [m for m in model.modules() if isinstance(m, ExpertShard)]


def apply_fsdp(model: nn.Module, meshes: Meshes) -> nn.Module:
    """Shard each interaction block, then the rest (embeddings, readout) at the root, over all ranks.

    Expert shards get their own FSDP group over the ``(dp, graph)`` ranks (2-D with the ``expert``
    placement), or none when that is a single rank. Each rank's loss is its share of the global loss
    (statistics are reduced across ranks inside the loss), so gradients are summed over ranks, not
    averaged: divide factor 1, with plain SUM collectives (FSDP would otherwise use PREMUL_SUM, which
    gloo lacks).
    """
    ignored: set[nn.Parameter] = set()
    wrapped: list[FSDPModule] = []
    for store in expert_stores(model):
        if meshes.dp_graph.size() > 1:
            fully_shard(store, mesh=meshes.dp_graph, reshard_after_forward=False)
            wrapped.append(store)
        else:
            ignored.update(store.parameters())
    for block in model.blocks:
        fully_shard(block, mesh=meshes.world, reshard_after_forward=False, ignored_params=ignored or None)
        wrapped.append(block)
    fully_shard(model, mesh=meshes.world, reshard_after_forward=False, ignored_params=ignored or None)
    wrapped.append(model)
    for module in wrapped:  # the settings are per FSDP module, not inherited
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
        module.set_reduce_scatter_unused_params(True)  # same reduce-scatter on every rank, used or not
    return model


@contextmanager
def step_phase(model: nn.Module) -> Iterator[None]:
    """Forward, force/stress backward and loss backward with parameters gathered and gradients local.

    Call `reduce_gradients` after the block (and after any gradient the model's sharding wrappers still
    owe, e.g. `janus.expert_parallel.return_gradients`)."""
    if isinstance(model, FSDPModule):
        model.set_reshard_after_backward(False)
        model.set_requires_gradient_sync(False)
    yield


def reduce_gradients(model: nn.Module) -> None:
    """Reduce-scatter every FSDP group's complete gradients in module order, then reshard.

    This is what FSDP2's final backward callback does for groups whose post-backward hook did not run;
    torch 2.13 has no public call for it yet (pytorch PR 196640 adds one), hence the private access,
    kept to this function.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        module.set_requires_gradient_sync(True, recurse=False)
        module.set_reshard_after_backward(True, recurse=False)
        for group in module._get_fsdp_state()._fsdp_param_groups:
            group.post_backward()
            group.finalize_backward()
            group._training_state = TrainingState.IDLE


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. a gradient norm) or the tensor itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local(value: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (differentiable), or the tensor itself."""
    return value.to_local() if isinstance(value, DTensor) else value


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients by their global 2-norm over all shards; returns the norm before clipping.

    Parameters live on different meshes (FSDP over all ranks, 2-D FSDP × expert, expert only), which
    `torch.nn.utils.clip_grad_norm_` cannot stack. Every logical gradient element lives in exactly one
    shard, so the global sum of squares is, per mesh, the sum over its sharded dims of the local sums
    (replicated dims counted once): one reduction per mesh, not per parameter.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        # sharded on a mesh dim (Shard, or FSDP's _StridedShard, whose is_shard() is False): sum over it
        key = (
            (g.device_mesh, tuple(not p.is_replicate() for p in g.placements))
            if isinstance(g, DTensor)
            else None
        )
        groups.setdefault(key, []).append(g)
    total = torch.zeros((), dtype=torch.float64)
    for key, members in groups.items():
        squares = torch.stack([local(g).double().square().sum() for g in members]).sum()
        if key is not None:
            mesh, sharded = key
            placements = [Partial() if s else Replicate() for s in sharded]
            squares = DTensor.from_local(squares, mesh, placements, run_check=False).full_tensor()
        total = total + squares.cpu()
    total = total.sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0 and math.isfinite(coef):
        for g in grads:
            g.mul_(coef)
    return total
