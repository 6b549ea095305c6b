"""Robust multi-task loss whose batch statistics are exact under data parallelism.

Per structure: energy-per-atom error |ΔE|/n (eV/atom), mean force error over its atoms (eV/Å, Euclidean
norm), mean stress error (GPa, absolute over the 9 components), mean magmom error (μB). Per task and
property, samples beyond the batch mean by more than k standard deviations are smoothly down-weighted,
w = 1 / (1 + relu((l - μ) / kσ)²) (detached); the term is the weighted mean Σ w l / Σ w.

Every statistic is a sum reduced with ``all_reduce`` (two calls, each on one flat vector of fixed length),
and each rank returns its share Σ_local w l / Σ_global w, so the per-rank losses and gradients add up to
those of the whole batch on one process. The MoE balance loss is shared the same way: expert loads and
token counts are reduced, the differentiable router probabilities stay local.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from matris.batch import Batch
from matris.config import LossConfig
from matris.model import load_balance_loss

COMPONENTS = ("energy", "force", "stress", "magmom")
EV_PER_A3_TO_GPA = 160.21766208


def per_sample_losses(pred: dict[str, torch.Tensor], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses (b, 4) in ``COMPONENTS`` order and a mask (b, 4) of the labels each structure has."""
    s, n_atoms = batch.atom_structure, batch.n_atoms.to(pred["energy"].dtype)
    zeros = pred["energy"].new_zeros(batch.num_structures)
    everyone = torch.ones_like(zeros, dtype=torch.bool)

    def per_structure(atom_values: torch.Tensor) -> torch.Tensor:
        return zeros.index_add(0, s, atom_values) / n_atoms

    terms = [(zeros, ~everyone)] * len(COMPONENTS)
    if batch.energy is not None:
        terms[0] = ((pred["energy"] - batch.energy).abs() / n_atoms, everyone)
    if batch.forces is not None and "forces" in pred:
        error = ((pred["forces"] - batch.forces).square().sum(-1) + 1e-12).sqrt()
        terms[1] = (per_structure(error), everyone)
    if batch.stress is not None and "stress" in pred:
        terms[2] = ((pred["stress"] - batch.stress).abs().mean((1, 2)) * EV_PER_A3_TO_GPA, batch.has_stress)
    if batch.magmoms is not None and "magmoms" in pred:
        terms[3] = (per_structure((pred["magmoms"] - batch.magmoms).abs()), batch.has_magmoms)
    mask = torch.stack([m for _, m in terms], dim=-1)
    return torch.stack([v for v, _ in terms], dim=-1).where(mask, 0.0), mask


def multitask_loss(
    pred: dict[str, torch.Tensor],
    batch: Batch,
    tasks: Sequence[str],
    config: LossConfig | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    active: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's share of the loss, and global metrics: f"{task}/{property}", ``aux`` and ``loss``.

    ``all_reduce`` sums a tensor over data-parallel ranks and returns the result (identity if ``None``).
    A rank with no structures of its own passes a stand-in batch with ``active=False``: it joins the
    reductions and returns a zero share that is still connected to every parameter.
    """
    config = config or LossConfig()
    reduce = all_reduce or (lambda x: x)
    weights = torch.tensor([getattr(config, c) for c in COMPONENTS], dtype=pred["energy"].dtype)
    weights = weights.to(pred["energy"].device)
    num_tasks, num_components = len(tasks), len(COMPONENTS)
    loss, mask = per_sample_losses(pred, batch)
    mask = mask & active
    loss = loss.where(mask, 0.0)
    detached, present = loss.detach(), mask.to(loss.dtype)
    counts, probs = pred["expert_counts"].detach() * active, pred["expert_probs"] * active

    moments = torch.stack([present, detached, detached.square()], dim=-1)
    moments = loss.new_zeros(num_tasks, num_components, 3).index_add(0, batch.task, moments)
    first = torch.cat([moments.flatten(), counts.flatten(), loss.new_tensor([batch.num_atoms * active])])
    first = reduce(first)
    moments = first[: moments.numel()].view(num_tasks, num_components, 3)
    counts = first[moments.numel() : -1].view_as(counts)
    num_tokens = first[-1]

    count = moments[..., 0].clamp(min=1)
    mean = moments[..., 1] / count
    std = (moments[..., 2] / count - mean.square()).clamp(min=0).sqrt()
    z = (detached - mean[batch.task]) / (config.outlier_k * std[batch.task] + 1e-12)
    w = present / (1 + torch.relu(z).square())

    sums = torch.stack([w, w * detached], dim=-1)
    sums = loss.new_zeros(num_tasks, num_components, 2).index_add(0, batch.task, sums)
    second = reduce(torch.cat([sums.flatten(), probs.detach().flatten()]))
    sums = second[: sums.numel()].view(num_tasks, num_components, 2)
    total_w = sums[..., 0].clamp(min=1e-12)

    local = loss.new_zeros(num_tasks, num_components).index_add(0, batch.task, w * loss)
    share = (local / total_w * weights).sum()
    share = share + config.aux * load_balance_loss(counts, probs, num_tokens)

    values = sums[..., 1] / total_w
    aux = load_balance_loss(counts, second[sums.numel() :].view_as(probs), num_tokens)
    has = moments[..., 0] > 0
    metrics = {
        f"{task}/{component}": value
        for task, row, has_row in zip(tasks, values.tolist(), has.tolist(), strict=True)
        for component, value, present_ in zip(COMPONENTS, row, has_row, strict=True)
        if present_
    }
    metrics["aux"] = float(aux)
    metrics["loss"] = float((values * weights).sum() + config.aux * aux)
    return share, metrics
