"""Deployment pruning: keep only the experts that a given set of elements can reach.

MatRIS-MoE routes by element alone (`matris.moe`): an atom of element z always uses the top-K experts of
router row z, weighted by a softmax over those K logits. For structures made only of the kept elements, an
expert outside every kept element's top-K is never evaluated, so dropping it (with its router column)
changes no prediction: each kept element still picks the same K experts, whose logits remain the K largest
of its row, with the same weights. The pruned model carries an ``allowed_elements`` buffer and a guard
that refuses any other element, since the experts those elements routed to may be gone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from ase.data import atomic_numbers, chemical_symbols

from matris.model import MatRIS
from matris.moe import MoE, deferred_experts

ALLOWED = "allowed_elements"


def parse_elements(text: str) -> list[int]:
    """Atomic numbers of a comma-separated list of element symbols or numbers (``"H,C,O"``, ``"1,6,8"``)."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if item.isdigit() and 0 < int(item) < len(chemical_symbols):
            out.append(int(item))
        elif item in atomic_numbers and item != "X":
            out.append(atomic_numbers[item])
        else:
            raise ValueError(f"unknown element {item!r} in {text!r}")
    return sorted(set(out))


def symbols(elements: Iterable[int]) -> str:
    return ",".join(chemical_symbols[int(z)] for z in elements)


def reachable_experts(layer: MoE, elements: list[int]) -> list[int]:
    """Experts that atoms of ``elements`` are routed to by one MoE layer."""
    _, experts = layer.router.detach()[elements].topk(layer.top_k, dim=-1)
    return sorted(set(experts.flatten().tolist()))


def prune_elements(model: MatRIS, elements: Iterable[int]) -> MatRIS:
    """A smaller copy of ``model`` that predicts identically on structures made of ``elements`` only.

    The config has one expert count for all MoE layers, so every layer keeps as many experts as the layer
    that needs most; a layer that needs fewer also keeps some unreachable ones, which still lie below the
    kept elements' top-K and are never chosen.
    """
    elements = sorted({int(z) for z in elements})
    config = model.config
    if not elements or not all(0 < z <= config.max_z for z in elements):
        raise ValueError(f"elements to keep must be atomic numbers in [1, {config.max_z}], got {elements}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    if not layers:
        raise ValueError("the model has no MoE layers: there are no experts to prune")
    reachable = {name: reachable_experts(m, elements) for name, m in layers.items()}
    size = max(len(experts) for experts in reachable.values())
    full = model.state_dict()
    # new tensors only, assigned as the pruned model's own: the experts kept are indexed copies (one copy
    # of what is kept, at most the model's size again), everything else is small and cloned
    state = {k: v.detach().clone() for k, v in full.items() if ".experts." not in k and k != ALLOWED}
    for name, experts in reachable.items():
        spare = [e for e in range(config.num_experts) if e not in experts][: size - len(experts)]
        keep = torch.tensor(sorted(experts + spare))
        state[f"{name}.router"] = full[f"{name}.router"].detach()[:, keep]
        for w in ("w1", "w3", "w2"):
            state[f"{name}.experts.{w}"] = full[f"{name}.experts.{w}"].detach()[keep]
    dtype = next(model.parameters()).dtype
    with deferred_experts():
        pruned = MatRIS(config.model_copy(update={"num_experts": size})).to(dtype)
    pruned.load_state_dict(state, strict=True, assign=True)
    restrict_elements(pruned, elements)
    return pruned.eval()


def restrict_elements(model: MatRIS, elements: Iterable[int]) -> None:
    """Record ``elements`` in the model (saved with it) and refuse structures containing any other."""
    model.register_buffer(ALLOWED, torch.tensor(sorted(int(z) for z in elements), dtype=torch.long))
    model.register_forward_pre_hook(_refuse_other_elements)


def _refuse_other_elements(model: MatRIS, args: tuple) -> None:
    z = args[0].atomic_numbers
    allowed = getattr(model, ALLOWED).to(z.device)
    other = z[~torch.isin(z, allowed)]
    if other.numel():
        raise ValueError(
            f"this model was pruned to elements {symbols(allowed.tolist())}; the structure also contains "
            f"{symbols(torch.unique(other).tolist())}, whose experts were removed: use the unpruned model"
        )
