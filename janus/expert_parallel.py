"""FSEP: expert weights sharded over the expert group, placed each step by the just-in-time planner.

`matris.moe.MoE` stacks its experts' weights as (num_experts, ...) parameters of one `Experts` module.
`parallelize_moe` swaps every MoE layer's class for `ShardedMoE` and its ``experts`` module for
`ExpertShard`, which holds dim-0 shards of the same parameters as DTensors on the ``expert`` mesh dim
(names unchanged, so checkpoints consolidate to the single-device state dict). Per forward of a layer:

1. the planner (`janus.planner`) turns the expert group's element histograms (gathered once per step,
   before the forward) and the router's top-K table into pieces: which rank computes which tokens of which
   active expert, balanced in tokens per rank;
2. the weights of each piece's expert travel from the rank storing them to the rank computing it (one
   all-to-all, outside autograd, like an FSDP all-gather: the received weights are leaves), and the
   tokens to the same rank (a twice-differentiable all-to-all);
3. each rank runs its experts as one batched call of matris' own `Experts.forward` (through
   `torch.func.functional_call`, so the expert code is the model's), and the outputs travel back.

Forces flow back through the token exchanges in the first backward and parameter gradients in the
second. After it, `return_gradients` sends each received weight's gradient back to the rank storing the
expert (the reverse all-to-all, summed there), before FSDP reduces the shards over the data-parallel
ranks. With graph sharding, only owned atoms (the first ``StepContext.n_owned`` rows) are routed; ghost
rows get zeros, which the ghost refresh overwrites.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.func import functional_call

from janus import planner
from janus.config import LayoutError
from janus.parallel import StepContext, exchange, local, transfer
from matris.moe import Experts, MoE


class ExpertShard(nn.Module):
    """This rank's experts (a dim-0 shard of every `Experts` parameter), as DTensors on the expert mesh.

    Its forward returns the local shards (detached: they leave autograd through `transfer`), so that FSDP,
    which shards them further over the data-parallel ranks, gathers them in its pre-forward hook and
    reduce-scatters the gradients `return_gradients` puts on them.
    """

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        super().__init__()
        size, rank = mesh.size(), mesh.get_local_rank()
        count = experts.w1.shape[0]
        if count % size:
            raise LayoutError(f"{count} experts cannot be sharded evenly over {size} expert ranks")
        per_rank = count // size
        if experts.w1.is_meta:  # built under `matris.moe.deferred_experts`: make this rank's rows only
            shards = experts.initial(rank * per_rank, per_rank, experts.w1.dtype)
        else:
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            shards = {k: p.detach()[mine].clone() for k, p in experts.named_parameters(recurse=False)}
        for name, param in experts.named_parameters(recurse=False):
            shard = shards[name].to(mesh.device_type)
            placed = DTensor.from_local(shard, mesh, [Shard(0)], run_check=False)
            self.register_parameter(name, nn.Parameter(placed, requires_grad=param.requires_grad))

    def forward(self) -> dict[str, torch.Tensor]:
        return {name: local(param).detach() for name, param in self.named_parameters(recurse=False)}


@dataclass
class _Pending:
    """Weights received for one layer's pieces, and how their gradients go back."""

    store: ExpertShard
    received: torch.Tensor  # (pieces, packed weights) leaf
    rows: torch.Tensor  # stored experts sent, in send order (indices into this rank's shard)
    send: list[int]
    recv: list[int]
    group: Any


class ShardedMoE(MoE):
    """`MoE` (class swapped in place) that routes only owned atoms and, with an expert group, dispatches
    them to the ranks the planner chose. Outputs match `MoE.forward`: (y, tokens per expert, router
    probabilities summed over the owned tokens)."""

    _janus_ctx: StepContext
    _janus_group: Any  # expert process group, or None without expert sharding
    _janus_compute: tuple[nn.Module]  # a weightless copy of the `Experts` module (not a submodule)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self._janus_ctx
        n = x.shape[0]
        n_owned = n if ctx.n_owned is None else ctx.n_owned
        x_own, z_own = x[:n_owned], z[:n_owned]
        if self._janus_group is None:
            y, counts, probs = MoE.forward(self, x_own, z_own)
        else:
            y, counts, probs = self._dispatch(x_own, z_own, ctx)
        return torch.cat([y, y.new_zeros(n - n_owned, y.shape[1])]), counts, probs

    def _dispatch(
        self, x: torch.Tensor, z: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        group, (compute,) = self._janus_group, self._janus_compute
        n, k, e, d = x.shape[0], self.top_k, self.num_experts, x.shape[1]
        experts, weights = self.route(z)
        table = self.router.detach().topk(k, dim=-1).indices.cpu().numpy()
        if ctx.histograms is None:
            raise RuntimeError("expert sharding needs the step's element histograms in the StepContext")
        plan = planner.plan(planner.expert_counts(ctx.histograms, table, e))
        ctx.plans.append(plan)
        params = self._gather_weights(plan, ctx, x.device)
        route = _TokenRoute(experts.flatten().cpu().numpy(), plan, group.rank(), e, group.size())

        send_index = torch.as_tensor(route.send_order, dtype=torch.long, device=x.device)
        slot_index = torch.as_tensor(route.slot, dtype=torch.long, device=x.device)
        outgoing = x.index_select(0, send_index // k)
        ctx.count("expert_tokens", outgoing)
        tokens = exchange(outgoing, route.recv, route.send, group)
        pieces, capacity = route.pieces, route.capacity
        grouped = x.new_zeros(pieces * capacity, d).index_copy(0, slot_index, tokens)
        out = functional_call(compute, params, (grouped.view(pieces, capacity, d),))
        out = out.reshape(-1, d).index_select(0, slot_index)
        ctx.count("expert_tokens", out)
        out = exchange(out, route.send, route.recv, group)
        gate = weights.flatten().index_select(0, send_index).unsqueeze(-1)
        y = x.new_zeros(n, d).index_add(0, send_index // k, out * gate)
        if self.shared is not None:
            y = y + self.shared(x)
        probs = F.softmax(self.router, dim=-1)[z].sum(0)
        return y, torch.as_tensor(route.counts, device=x.device).to(x.dtype), probs

    def _gather_weights(self, plan: planner.ExpertPlan, ctx: StepContext, device: torch.device) -> dict:
        """The weights of the experts this rank computes pieces of, by parameter name: each rank sends
        the experts it stores to the ranks computing them; their gradients go back after the backward."""
        group = self._janus_group
        ranks, me = group.size(), group.rank()
        stored = self.experts()
        per_rank = self.num_experts // ranks
        owner = [plan.experts_on(q) // per_rank for q in range(ranks)]
        mine = [plan.experts_on(q)[owner[q] == me] - me * per_rank for q in range(ranks)]
        w_send = [len(rows) for rows in mine]
        w_recv = np.bincount(owner[me], minlength=ranks).tolist()
        rows = torch.as_tensor(np.concatenate(mine), dtype=torch.long, device=device)
        sent = torch.cat([w.index_select(0, rows).flatten(1) for w in stored.values()], dim=1)
        ctx.count("expert_weights", sent)
        received = transfer(sent, w_recv, w_send, group).requires_grad_()
        ctx.pending.append(_Pending(self.experts, received, rows, w_send, w_recv, group))
        params, offset = {}, 0
        for name, w in stored.items():
            size = math.prod(w.shape[1:])
            params[name] = received[:, offset : offset + size].reshape(-1, *w.shape[1:])
            offset += size
        return params


class _TokenRoute:
    """Where this rank's token dispatches go and where received ones sit in the padded expert groups.

    Dispatches are sorted by expert, then by destination rank (each destination's pieces in ascending
    expert order, each expert's tokens in source order). ``send``/``recv``: tokens per rank; ``slot``: the
    row of each received token in the (pieces, capacity) groups; ``counts``: dispatches per expert."""

    def __init__(self, flat: np.ndarray, plan: planner.ExpertPlan, me: int, e: int, ranks: int):
        order = np.argsort(flat, kind="stable")
        ranked = flat[order]
        self.counts = np.bincount(flat, minlength=e)
        start = np.cumsum(self.counts) - self.counts
        prefix = (np.cumsum(plan.counts, axis=0) - plan.counts)[me]
        position = prefix[ranked] + np.arange(len(ranked)) - start[ranked]
        dest = plan.destination(ranked, position) if len(ranked) else np.zeros(0, np.int64)
        self.send_order = order[np.argsort(dest * e + ranked, kind="stable")]
        self.send = np.bincount(dest, minlength=ranks).tolist()
        recv = plan.recv_counts(me)  # (sources, local pieces)
        self.recv = recv.sum(1).tolist()
        lengths = recv.sum(0)
        self.pieces, self.capacity = len(lengths), int(lengths.max(initial=0))
        base = np.arange(self.pieces) * self.capacity + (np.cumsum(recv, axis=0) - recv)  # (sources, pieces)
        runs = recv.ravel()
        within = np.arange(runs.sum()) - np.repeat(np.cumsum(runs) - runs, runs)
        self.slot = np.repeat(base.ravel(), runs) + within


def gathered_weights(ctx: StepContext) -> list[torch.Tensor]:
    """The expert weights gathered for this step: leaves of the loss's graph whose gradients
    `return_gradients` sends back, so the loss backward must reach them."""
    return [item.received for item in ctx.pending]


@torch.no_grad()
def return_gradients(ctx: StepContext) -> None:
    """After the loss backward: each received expert weight's gradient goes back to the rank storing it
    and is added to the stored shard's gradient (in forward order, on every rank alike)."""
    for item in ctx.pending:
        grad = item.received.grad
        if grad is None:
            grad = torch.zeros_like(item.received)
        back = transfer(grad, item.send, item.recv, item.group)
        ctx.count("expert_weights", grad)
        params = dict(item.store.named_parameters(recurse=False))
        first = next(iter(params.values()))
        total = back.new_zeros(local(first).shape[0], back.shape[1]).index_add(0, item.rows, back)
        offset = 0
        for param in params.values():
            shard = local(param)
            size = math.prod(shard.shape[1:])
            value = total[:, offset : offset + size].reshape(shard.shape)
            offset += size
            if isinstance(param, DTensor):
                value = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False)
            param.grad = value if param.grad is None else param.grad + value
    ctx.pending.clear()


def parallelize_moe(model: nn.Module, ctx: StepContext, mesh: DeviceMesh | None) -> list[ShardedMoE]:
    """Swap every MoE layer for a `ShardedMoE` reading ``ctx``; shard its experts over ``mesh`` if given."""
    layers = []
    for module in list(model.modules()):
        if not isinstance(module, MoE) or isinstance(module, ShardedMoE):
            continue
        module.__class__ = ShardedMoE
        module._janus_ctx = ctx
        module._janus_group = None
        if mesh is not None and mesh.size() > 1:
            compute = _weightless_copy(module.experts)
            module.experts = ExpertShard(module.experts, mesh)
            module._janus_compute = (compute,)
            module._janus_group = mesh.get_group()
        layers.append(module)
    return layers


def _weightless_copy(experts: nn.Module) -> nn.Module:
    """The `Experts` module with meta-device parameters: only its forward code is used (by
    `functional_call`, with the weights gathered for the step's pieces)."""
    clone = copy.copy(experts)
    clone._parameters = {
        name: nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, p in experts._parameters.items()
        if p is not None
    }
    return clone
