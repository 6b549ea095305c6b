"""Neighbour graphs for one structure, from compiled cell lists (no Python loops over atom pairs).

Two libraries, each where it is fast. pymatgen's ``find_points_in_spheres`` (Cython) gives vesin's edge sets
faster on dense structures: ``benchmarks/bench_data_prep.py`` ("components") measured 0.19 ms per 19-atom
crystal of the shared data against vesin's 0.30 ms, and 0.08 against 0.11 ms per molecule. But it bins the
whole bounding box on a cutoff-sized grid, so a sparse structure costs it time and memory by volume: 500
atoms spread over 1,000 Å took it 2.3 s, and this module 0.01 s through vesin (same benchmark). Structures
whose grid would hold more than ``MAX_BINS_PER_ATOM`` bins per atom (plus ``FREE_BINS``) go to vesin.

Shared by data preparation (graphs stored in HDF5 shards) and by the ASE calculator, so training and
inference see the same edges. Only the two-body graph is built here; the three-body line graph is derived
from it inside the model (`matris.model.line_graph`), because it depends on the bond lengths and is cheap
to rebuild from edges, while storing it would multiply shard size by the ~5 triplets per edge.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from pymatgen.optimization.neighbors import find_points_in_spheres
from vesin import NeighborList

MAX_BINS_PER_ATOM = 64
FREE_BINS = 4096


@dataclass(frozen=True)
class StructureGraph:
    """One structure with its two-body graph and labels, as numpy arrays (the collate input).

    Edges are directed: ``edge_index[0]`` is the centre atom i, ``edge_index[1]`` the neighbour j, and the
    bond vector is ``positions[j] + edge_shift @ cell - positions[i]``. Labels are in ASE units (eV, eV/Å,
    eV/Å³ with ASE's sign); ``None`` means the label is absent (molecules have no stress).
    """

    atomic_numbers: np.ndarray  # (n,) int64
    positions: np.ndarray  # (n, 3) float64, Å
    cell: np.ndarray  # (3, 3) float64, Å (zeros for a non-periodic structure)
    pbc: np.ndarray  # (3,) bool
    edge_index: np.ndarray  # (2, e) int64
    edge_shift: np.ndarray  # (e, 3) int32 cell shifts of the neighbour
    task: int = 0
    charge: float = 0.0
    spin: float = 1.0  # multiplicity
    energy: float | None = None
    forces: np.ndarray | None = None  # (n, 3)
    stress: np.ndarray | None = None  # (3, 3)
    magmoms: np.ndarray | None = None  # (n,)

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])


class Neighbours(NamedTuple):
    edge_index: np.ndarray  # (2, e) int64: centre i, neighbour j
    edge_shift: np.ndarray  # (e, 3) int32 cell shifts of the neighbour
    distance: np.ndarray  # (e,) float64, Å


_thread = threading.local()


def _vesin_list(cutoff: float) -> NeighborList:
    """One vesin list per thread and cutoff, reused: creating one costs about a third of a crystal's
    search, and a list must not be shared between threads."""
    lists = _thread.__dict__.setdefault("lists", {})
    if cutoff not in lists:
        lists[cutoff] = NeighborList(cutoff=cutoff, full_list=True, sorted=True)
    return lists[cutoff]


def neighbor_graph(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Neighbours:
    """Directed edges, integer cell shifts and lengths of all pairs closer than ``cutoff``, sorted by centre.

    Works for periodic, partly periodic and non-periodic structures; a non-periodic direction with a zero
    cell vector gets a bounding box large enough that no image is searched.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    cell = np.array(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    if len(positions) == 0:
        return Neighbours(np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int32), np.zeros(0))
    if pbc.any():
        cell = _box_for_open_directions(positions, cell, pbc, cutoff)  # and rejects a singular cell
    if _grid_bins(positions, cell, pbc, cutoff) > MAX_BINS_PER_ATOM * len(positions) + FREE_BINS:
        return vesin_graph(positions, cell, pbc, cutoff)
    search_cell = cell if pbc.any() else np.eye(3)  # no images: any cell serves, and a small one is faster
    centre, neighbour, shifts, distances = find_points_in_spheres(
        positions, positions, float(cutoff), pbc.astype(np.int64), search_cell, tol=1e-8
    )
    pair = (centre != neighbour) | (distances > 1e-8)  # not an atom with itself in its own cell
    return Neighbours(
        np.stack([centre[pair], neighbour[pair]]),
        np.rint(shifts[pair]).astype(np.int32),
        distances[pair],
    )


def vesin_graph(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> Neighbours:
    """``neighbor_graph``'s search for sparse structures, through vesin (also timed on its own by
    ``benchmarks/bench_data_prep.py``); arrays as ``neighbor_graph`` prepares them."""
    box = cell if pbc.all() else _box_for_open_directions(positions, cell, pbc, cutoff)
    pairs, shifts, distances = _vesin_list(float(cutoff)).compute(
        points=positions, box=box, periodic=pbc, quantities="PSd", copy=False
    )
    # copy=False returns views into the list's buffers: the astype calls copy them before its next use
    return Neighbours(pairs.T.astype(np.int64), shifts.astype(np.int32), distances.astype(np.float64))


def _grid_bins(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> float:
    """Cutoff-sized bins over the bounding box of ``cell`` (periodic in some direction, with open directions
    already boxed) or of the atoms (open), padded by a cutoff on each side: pymatgen's grid, within a bin
    per axis."""
    extent = np.abs(cell).sum(axis=0) if pbc.any() else np.ptp(positions, axis=0)
    return float(np.prod(extent / cutoff + 4.0))


def count_triplets(centre: np.ndarray, distance: np.ndarray, n_atoms: int, cutoff: float) -> int:
    """Ordered pairs of distinct bonds shorter than ``cutoff`` sharing a centre: Σ_i k_i (k_i - 1), the
    size of the line graph the model builds (`matris.model.line_graph`)."""
    degree = np.bincount(centre[distance < cutoff], minlength=n_atoms)
    return int((degree * (degree - 1)).sum())


def _box_for_open_directions(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> np.ndarray:
    """Replace the cell vectors of non-periodic directions by a box that encloses every atom with margin;
    raise ``ValueError`` if the result is singular (a degenerate periodic cell)."""
    box = cell.copy()
    span = positions.max(axis=0) - positions.min(axis=0)
    for axis in range(3):
        if not pbc[axis]:
            vector = np.zeros(3)
            vector[axis] = span.max() + 2.0 * cutoff + 1.0
            box[axis] = vector
    if abs(np.linalg.det(box)) < 1e-8:
        raise ValueError("cell is singular")
    return box


def bond_lengths(
    positions: np.ndarray, cells: np.ndarray, centre: np.ndarray, neighbour: np.ndarray, shift: np.ndarray
) -> np.ndarray:
    """|r_j + shift·cell − r_i| of each edge (Å); ``cells`` is one (3, 3) cell or one per edge (e, 3, 3)."""
    offset = shift @ cells if cells.ndim == 2 else np.einsum("ek,ekl->el", shift, cells)
    return np.linalg.norm(positions[neighbour] + offset - positions[centre], axis=1)


def within_cutoff(graph: StructureGraph, cutoff: float) -> StructureGraph:
    """``graph`` without its edges of ``cutoff`` or longer. A model whose cutoff is below the data's gives
    those edges zero weight (every envelope vanishes there), so dropping them changes no output and saves
    their whole cost."""
    centre, neighbour = graph.edge_index
    keep = bond_lengths(graph.positions, graph.cell, centre, neighbour, graph.edge_shift) < cutoff
    return replace(graph, edge_index=graph.edge_index[:, keep], edge_shift=graph.edge_shift[keep])


def graph_from_atoms(atoms, cutoff: float, task: int = 0) -> StructureGraph:
    """Build the graph of an ``ase.Atoms`` (no labels); charge and spin come from ``atoms.info``."""
    edge_index, edge_shift, _ = neighbor_graph(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    return StructureGraph(
        atomic_numbers=atoms.numbers.astype(np.int64),
        positions=atoms.positions.astype(np.float64),
        cell=atoms.cell.array.astype(np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        edge_index=edge_index,
        edge_shift=edge_shift,
        task=task,
        charge=float(atoms.info.get("charge", 0.0)),
        spin=float(atoms.info.get("spin", 1.0)),
    )
