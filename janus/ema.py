"""Exponential moving average of the parameters, sharded exactly like them.

The shadow copies are DTensors with each parameter's own placements (FSDP shards, expert shards), so the
EMA costs one more copy of this rank's parameter shards, updates with local elementwise ops only, and is
saved by torch.distributed.checkpoint under its own ``ema.`` prefix with the model's parameter names:
it reshards on load and consolidates to a single-device state dict like the model does.
"""

from __future__ import annotations

import torch
from torch import nn

from janus.parallel import local


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            local(self.shadow[name]).lerp_(local(p.detach()), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (e.g. before an evaluation)."""
        for name, p in model.named_parameters():
            local(p).copy_(local(self.shadow[name]))
