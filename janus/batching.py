"""Which structures of a global batch each rank computes, and how a large structure is cut for FSGP.

The global batch of a step is fixed by the data, the seed and the budget (`data_prep.loader.BatchPlan`).
Every rank of the (dp, graph, expert) mesh holds distinct data: expert-parallel ranks are data-parallel
for everything but the experts, so the batch is first split over the ``dp × expert`` *data groups*, each
of which is one graph group. Inside a graph group, structures too large for one rank (heavier than an
even share of what is left) are partitioned spatially over all ``graph`` ranks; the rest are spread over
the group's ranks whole, as ordinary data parallelism.

A data group that the split leaves empty runs the batch's first structure as a stand-in with
``active=False``: it joins every collective and contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data_prep.loader import split_for_ranks
from matris.batch import Batch, collate
from matris.graph import StructureGraph


@dataclass(frozen=True)
class Coordinates:
    """This rank's place in the (dp, graph, expert) mesh."""

    dp: int
    graph: int
    expert: int
    dp_size: int
    graph_size: int
    expert_size: int

    @property
    def data_group(self) -> int:
        return self.dp * self.expert_size + self.expert

    @property
    def num_data_groups(self) -> int:
        return self.dp_size * self.expert_size


@dataclass(frozen=True)
class RankWork:
    """The structures one rank computes in one step (global dataset indices)."""

    whole: list[int]  # computed entirely on this rank
    partitioned: list[int]  # cut over the whole graph group (the same list on every rank of the group)
    active: bool  # False: stand-in work that contributes nothing
    loss_owner: dict[int, int] = field(default_factory=dict)  # partitioned index -> graph rank of its loss
    graph_rank: int = 0

    @property
    def loss_structures(self) -> list[int]:
        """Structures whose loss terms this rank holds (whole ones, then owned partitioned ones)."""
        return self.whole + [i for i in self.partitioned if self.loss_owner[i] == self.graph_rank]


def assign(global_batch: list[int], sizes: np.ndarray, where: Coordinates) -> RankWork:
    """Deterministic: every rank computes the same assignment for every other rank."""
    groups = split_for_ranks(global_batch, sizes, where.num_data_groups)
    mine, active = groups[where.data_group], True
    if not mine:
        mine, active = list(global_batch[:1]), False
    if where.graph_size == 1:
        return RankWork(whole=mine, partitioned=[], active=active)
    partitioned, rest = choose_partitioned(mine, sizes, where.graph_size)
    whole = split_for_ranks(rest, sizes, where.graph_size)[where.graph] if rest else []
    owner = {idx: k % where.graph_size for k, idx in enumerate(partitioned)}
    return RankWork(
        whole=whole, partitioned=partitioned, active=active, loss_owner=owner, graph_rank=where.graph
    )


def choose_partitioned(indices: list[int], sizes: np.ndarray, parts: int) -> tuple[list[int], list[int]]:
    """Split ``indices`` into (partitioned, whole): the heaviest structure (by edges) is partitioned while
    it carries more than an even share of the remaining edges. Both lists keep the order of ``indices``."""
    sizes = np.atleast_2d(np.asarray(sizes))
    remaining = sorted(indices, key=lambda i: (-int(sizes[i, 1]), -int(sizes[i, 0]), indices.index(i)))
    total = sum(int(sizes[i, 1]) for i in remaining)
    cut = set()
    while remaining and int(sizes[remaining[0], 1]) * parts > total:
        heaviest = remaining.pop(0)
        cut.add(heaviest)
        total -= int(sizes[heaviest, 1])
    return [i for i in indices if i in cut], [i for i in indices if i not in cut]


def partition(graph: StructureGraph, parts: int) -> np.ndarray:
    """Part (0..parts-1) of every atom: recursive coordinate bisection balanced by edges.

    Periodic cells are cut in wrapped fractional coordinates scaled by the cell heights, so slabs meet
    across the periodic boundary and atom images never matter (halo atoms come from the edge list, which
    carries the periodic shifts). Each atom weighs its number of edges (+1): the edges it is the centre of
    are the ones its rank computes.
    """
    n = graph.n_atoms
    weight = np.bincount(graph.edge_index[0], minlength=n).astype(np.float64) + 1.0
    coords = _cut_coordinates(graph)
    out = np.zeros(n, dtype=np.int64)
    _bisect(np.arange(n), coords, weight, parts, 0, out)
    return out


def _cut_coordinates(graph: StructureGraph) -> np.ndarray:
    cell = np.asarray(graph.cell, dtype=np.float64)
    volume = abs(float(np.linalg.det(cell))) if np.asarray(graph.pbc).all() else 0.0
    if volume < 1e-8:
        return np.asarray(graph.positions, dtype=np.float64)
    frac = np.linalg.solve(cell.T, np.asarray(graph.positions, dtype=np.float64).T).T
    frac -= np.floor(frac)
    heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    return frac * heights


def _bisect(
    idx: np.ndarray, coords: np.ndarray, weight: np.ndarray, k: int, first: int, out: np.ndarray
) -> None:
    if k == 1 or len(idx) == 0:
        out[idx] = first
        return
    sub = coords[idx]
    axis = int(np.argmax(sub.max(0) - sub.min(0)))
    order = idx[np.lexsort((idx, sub[:, axis]))]
    low = k // 2
    cum = np.cumsum(weight[order])
    target = cum[-1] * low / k
    c = int(np.searchsorted(cum, target))  # cum[c] >= target: take c or c + 1 atoms, whichever is closer
    below = cum[c - 1] if c > 0 else 0.0
    count = c + 1 if cum[min(c, len(cum) - 1)] - target <= target - below else c
    _bisect(order[:count], coords, weight, low, first, out)
    _bisect(order[count:], coords, weight, k - low, first + low, out)


def loss_batch(
    graphs: list[StructureGraph], dtype: torch.dtype, device: torch.device, magmoms: bool
) -> Batch:
    """The labelled batch a rank's loss reads, with every label tensor present (absent labels are zeros
    with a False mask), so all ranks build the same graph of operations whatever their data. An empty
    list gives an empty batch."""
    batch = collate(graphs, dtype=dtype) if graphs else _empty_batch(dtype)
    b, n = batch.num_structures, batch.num_atoms
    if batch.stress is None:
        batch.stress = torch.zeros(b, 3, 3, dtype=dtype)
        batch.has_stress = torch.zeros(b, dtype=torch.bool)
    if magmoms and batch.magmoms is None:
        batch.magmoms = torch.zeros(n, dtype=dtype)
        batch.has_magmoms = torch.zeros(b, dtype=torch.bool)
    if not magmoms:
        batch.magmoms = batch.has_magmoms = None
    return batch.to(device)


def _empty_batch(dtype: torch.dtype) -> Batch:
    long, real = torch.long, dtype
    return Batch(
        atomic_numbers=torch.zeros(0, dtype=long),
        positions=torch.zeros(0, 3, dtype=real),
        cell=torch.zeros(0, 3, 3, dtype=real),
        pbc=torch.zeros(0, 3, dtype=torch.bool),
        atom_structure=torch.zeros(0, dtype=long),
        n_atoms=torch.zeros(0, dtype=long),
        edge_index=torch.zeros(2, 0, dtype=long),
        edge_shift=torch.zeros(0, 3, dtype=real),
        task=torch.zeros(0, dtype=long),
        charge=torch.zeros(0, dtype=real),
        spin=torch.zeros(0, dtype=real),
        energy=torch.zeros(0, dtype=real),
        forces=torch.zeros(0, 3, dtype=real),
    )
