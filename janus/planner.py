"""Just-in-time expert placement for FSEP: which rank computes which experts, known before the forward.

MatRIS-MoE routes by element (an atom's top-K experts are a function of its atomic number only), so the
token load of every expert follows from the batch's element histogram and the router table, before any
activation exists. `plan` turns the loads into *pieces*: contiguous ranges of one expert's tokens, each
computed by one rank of the expert group. Only experts with tokens get pieces ("activated"); experts are
taken heaviest first and poured into the ranks in order, each rank taking exactly its share of the total
load (water-filling), so an expert heavier than a rank's share is split over consecutive ranks and many
light experts share a rank. The per-rank loads therefore differ by at most one token, and at most
``active + ranks - 1`` pieces exist (a rank receives the weights of each expert it computes a piece of).

The global order of one expert's tokens is source-rank-major (rank 0's tokens of that expert first, in
its own dispatch order), which lets every rank work out, without communication, how many of its tokens
go to which piece (`send_counts`) and how many each piece receives from every source (`recv_counts`).

Everything here is plain numpy on small arrays (experts × ranks); `benchmarks/bench_janus.py` times it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExpertPlan:
    """Placement of one MoE layer's tokens on the ranks of an expert group.

    Pieces are sorted by (expert, start); ``piece_start`` is the offset of the piece in the expert's
    global token order and ``piece_len`` its length; ``piece_rank`` the rank that computes it.
    """

    counts: np.ndarray  # (ranks, experts) tokens each source rank sends to each expert
    piece_expert: np.ndarray  # (pieces,)
    piece_rank: np.ndarray  # (pieces,)
    piece_start: np.ndarray  # (pieces,)
    piece_len: np.ndarray  # (pieces,)

    @property
    def num_ranks(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def expert_load(self) -> np.ndarray:
        return self.counts.sum(0)

    @property
    def rank_load(self) -> np.ndarray:
        return np.bincount(self.piece_rank, weights=self.piece_len, minlength=self.num_ranks).astype(np.int64)

    @property
    def imbalance(self) -> float:
        """Max over mean token load per rank (1.0 is perfect balance)."""
        return _imbalance(self.rank_load)

    def static_imbalance(self) -> float:
        """The imbalance without the planner: expert e computed where it is stored (contiguous blocks)."""
        per_rank = self.num_experts // self.num_ranks
        owner = np.arange(self.num_experts) // max(per_rank, 1)
        return _imbalance(np.bincount(owner, weights=self.expert_load, minlength=self.num_ranks))

    def experts_on(self, rank: int) -> np.ndarray:
        """Experts whose pieces ``rank`` computes, ascending (one piece per expert and rank)."""
        return self.piece_expert[self.piece_rank == rank]

    def send_counts(self, rank: int) -> np.ndarray:
        """(ranks, experts): how many of ``rank``'s tokens of each expert go to each destination rank."""
        prefix = _exclusive_cumsum(self.counts, axis=0)[rank]  # where this rank's tokens start, per expert
        lo = prefix[self.piece_expert]
        hi = lo + self.counts[rank, self.piece_expert]
        overlap = np.minimum(hi, self.piece_start + self.piece_len) - np.maximum(lo, self.piece_start)
        out = np.zeros((self.num_ranks, self.num_experts), dtype=np.int64)
        np.add.at(out, (self.piece_rank, self.piece_expert), np.maximum(overlap, 0))
        return out

    def recv_counts(self, rank: int) -> np.ndarray:
        """(ranks, local pieces): tokens each source sends to each of ``rank``'s pieces (ascending expert)."""
        mine = self.piece_rank == rank
        expert, start, length = self.piece_expert[mine], self.piece_start[mine], self.piece_len[mine]
        prefix = _exclusive_cumsum(self.counts, axis=0)[:, expert]  # (ranks, local pieces)
        lo, hi = prefix, prefix + self.counts[:, expert]
        overlap = np.minimum(hi, start + length) - np.maximum(lo, start)
        return np.maximum(overlap, 0)

    def destination(self, expert: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Rank computing the token at global ``position`` within ``expert`` (arrays of equal shape)."""
        scale = int(self.piece_start.max(initial=0) + self.piece_len.max(initial=0)) + 1
        keys = self.piece_expert * scale + self.piece_start
        return self.piece_rank[np.searchsorted(keys, expert * scale + position, side="right") - 1]


def expert_counts(histograms: np.ndarray, table: np.ndarray, num_experts: int) -> np.ndarray:
    """(ranks, experts) token counts from per-rank element histograms (ranks, Z) and top-K table (Z, K).

    A sum over each expert's elements (present elements only), without BLAS: a multi-threaded BLAS call
    this small is slower than the sum itself on a busy node."""
    by_element = np.ascontiguousarray(np.asarray(histograms, dtype=np.int64).T)  # (Z, ranks)
    present = np.flatnonzero(by_element.any(1))
    experts = np.asarray(table, dtype=np.int64)[present].ravel()
    order = np.argsort(experts, kind="stable")
    ranked = experts[order]
    rows = np.repeat(present, table.shape[1])[order]
    out = np.zeros((num_experts, by_element.shape[1]), dtype=np.int64)
    if len(ranked):
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        out[ranked[starts]] = np.add.reduceat(by_element[rows], starts, axis=0)
    return out.T


def plan(counts: np.ndarray) -> ExpertPlan:
    """Water-filling placement of the experts' token loads onto ``counts.shape[0]`` ranks."""
    counts = np.asarray(counts, dtype=np.int64)
    ranks, _ = counts.shape
    load = counts.sum(0)
    total = int(load.sum())
    quota = np.full(ranks, total // ranks, dtype=np.int64)
    quota[: total % ranks] += 1
    active = np.flatnonzero(load)
    order = active[np.lexsort((active, -load[active]))]  # heaviest first, ties by expert id
    pieces: list[tuple[int, int, int, int]] = []  # (expert, rank, start, length)
    rank, room = 0, int(quota[0]) if ranks else 0
    for e in order.tolist():
        start, left = 0, int(load[e])
        while left:
            while room == 0:
                rank += 1
                room = int(quota[rank])
            take = min(left, room)
            pieces.append((e, rank, start, take))
            start, left, room = start + take, left - take, room - take
    arr = np.array(sorted(pieces), dtype=np.int64).reshape(-1, 4)
    return ExpertPlan(counts, arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])


def _exclusive_cumsum(x: np.ndarray, axis: int) -> np.ndarray:
    return np.cumsum(x, axis=axis) - x


def _imbalance(load: np.ndarray) -> float:
    mean = float(np.mean(load)) if len(load) else 0.0
    return float(np.max(load)) / mean if mean > 0 else 1.0
