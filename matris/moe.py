"""Element-routed mixture of experts: an atom's experts are a learned function of its element only.

The router is a table (max_z + 1, num_experts) of logits; each element takes its top-K experts with softmax
weights over those K. Tokens are grouped by expert into a zero-padded (num_experts, capacity, dim) tensor
and all experts run as one ``torch.bmm``. ``torch._grouped_mm`` would avoid the padding, but on CPU it takes
float32 only and has no double backward, which training needs because the loss differentiates forces.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from matris.layers import GatedMLP

_deferred = False


@contextmanager
def deferred_experts() -> Iterator[None]:
    """Models built inside leave their expert weights on the meta device, unallocated: a trainer then
    allocates and initialises only the experts a rank stores (`Experts.initial`), so no rank ever holds
    every expert of a billion-parameter model. `materialize_experts` fills the rest in place."""
    global _deferred
    before, _deferred = _deferred, True
    try:
        yield
    finally:
        _deferred = before


class Experts(nn.Module):
    """Stacked SwiGLU experts, weights (num_experts, in, out); janus shards them along dim 0.

    Each expert's initial weights come from its own generator, seeded from the global one once per
    module, so any rows of them (a rank's shard) can be made alone and equal the rows of the full tensors.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.seed = int(torch.randint(2**62, (), device="cpu"))
        self.shapes = {"w1": (dim, hidden), "w3": (dim, hidden), "w2": (hidden, dim)}
        if _deferred:
            weights = {k: torch.empty(num_experts, *shape, device="meta") for k, shape in self.shapes.items()}
        else:
            weights = self.initial(0, num_experts)
        for name, value in weights.items():
            self.register_parameter(name, nn.Parameter(value))

    def initial(self, first: int, count: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Initial values of experts ``first .. first + count - 1`` of every weight, on the CPU: uniform
        in ±1/√fan_in, drawn in float32 whatever ``dtype`` (a cast, as for a model built then converted)."""
        out = {name: torch.empty(count, *shape, dtype=dtype) for name, shape in self.shapes.items()}
        for row in range(count):
            generator = torch.Generator().manual_seed(self.seed + first + row)
            for value in out.values():
                bound = 1 / math.sqrt(value.shape[1])
                value[row] = torch.empty(value.shape[1:]).uniform_(-bound, bound, generator=generator)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (num_experts, capacity, dim) → same shape, each expert applied to its own rows."""
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)


class MoE(nn.Module):
    """Routed experts plus always-on shared experts (fused into one dense gated MLP)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, num_shared: int, max_z: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Parameter(torch.randn(max_z + 1, num_experts) * 0.01)
        self.experts = Experts(num_experts, dim, hidden)
        self.shared = GatedMLP(dim, num_shared * hidden) if num_shared else None

    def route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts (n, K) and their weights (n, K) of atoms with atomic numbers ``z``."""
        logits, experts = self.router.topk(self.top_k, dim=-1)
        return experts[z], F.softmax(logits, dim=-1)[z]

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output (n, dim), tokens per expert (E,) and summed router probabilities (E,) for the aux loss."""
        n, k, e = x.shape[0], self.top_k, self.num_experts
        experts, weights = self.route(z)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=e)
        capacity = int(counts.max()) if n else 0
        ranked = flat[order]
        slot = ranked * capacity + torch.arange(n * k, device=x.device) - (counts.cumsum(0) - counts)[ranked]
        token = order // k
        grouped = x.new_zeros(e * capacity, x.shape[1]).index_copy(0, slot, x[token])
        out = self.experts(grouped.view(e, capacity, -1)).reshape(e * capacity, -1)[slot]
        y = x.new_zeros(x.shape).index_add(0, token, out * weights.flatten()[order].unsqueeze(-1))
        if self.shared is not None:
            y = y + self.shared(x)
        probs = F.softmax(self.router, dim=-1)[z].sum(0)
        return y, counts.to(x.dtype), probs


@torch.no_grad()
def materialize_experts(model: nn.Module, initialize: bool = True) -> None:
    """Allocate the expert weights still on the meta device (a model built under `deferred_experts`) on
    the CPU in their dtype, with their initial values, or left empty to be loaded into."""
    for module in model.modules():
        if not isinstance(module, Experts) or not module.w1.is_meta:
            continue
        count, dtype = module.w1.shape[0], module.w1.dtype
        if initialize:
            weights = module.initial(0, count, dtype)
        else:
            weights = {k: torch.empty(count, *shape, dtype=dtype) for k, shape in module.shapes.items()}
        for name, value in weights.items():
            setattr(module, name, nn.Parameter(value, requires_grad=getattr(module, name).requires_grad))
