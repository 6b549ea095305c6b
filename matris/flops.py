"""FLOPs of one training step, split into its three phases, counted by torch's FlopCounterMode.

Matmuls (including the experts' ``bmm``) are counted; scatters and elementwise ops count zero, so this is
the matmul work that sets peak-relative efficiency. The step is forward, force backward with
``create_graph=True``, then the parameter backward of a loss on energies and forces
(`matris.properties.parameter_backward`, as in training).
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode

from matris.batch import Batch
from matris.model import MatRIS
from matris.properties import derivatives, inputs, parameter_backward


def model_flops(model: MatRIS, batch: Batch) -> dict[str, int]:
    """FLOPs of ``forward``, ``force_backward`` and ``param_backward`` for ``batch``, and their ``total``."""
    positions, strain = inputs(batch)
    phases = {}
    with FlopCounterMode(display=False) as counter:
        out = model(batch, positions, strain)
    phases["forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        grads = derivatives(out["energy"], positions, strain, batch, create_graph=True)
    phases["force_backward"] = counter.get_total_flops()
    loss = out["energy"].square().sum() + sum(g.square().sum() for g in grads.values())
    with FlopCounterMode(display=False) as counter:
        parameter_backward(loss, model)
    phases["param_backward"] = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    phases["total"] = sum(phases.values())
    return phases
