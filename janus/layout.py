"""Layout planner: the (dp, graph, expert) sizes and the batch budget of a run, from memory.

Every factorisation of the ranks into ``dp × graph × expert`` that the model allows (the expert group
divides the experts) is costed with `janus.memory`: the state of a rank, and the activations and halo of
the data's largest structure cut over the graph group. Of the layouts that fit a rank's memory, the one
with the least communication per step wins (estimated below; ties go to the narrower graph group). The
batch budget then fills what the chosen layout leaves free, at the data's mean edges and triplets per
atom. `PlanError` names the numbers when nothing fits, and the smallest node count that would.

Communication per rank and step, in bytes of the training dtype: FSDP all-gathers and reduce-scatters the
dense parameters over all ranks and the experts' shards over the ``(dp, graph)`` ranks; FSEP moves about
one expert shard of weights to the ranks computing them and their gradients back, and each routed token
twice per MoE layer in each of the forward, the force backward and the loss backward; the halo sends
every ghost row twice per block in the same three passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from janus.config import ParallelConfig
from janus.memory import (
    GIB,
    Calibration,
    MemoryEstimate,
    ParameterCounts,
    RankWork,
    dtype_bytes,
    estimate,
    parameter_counts,
)
from matris.config import ModelConfig

HEADROOM = 0.9  # of a rank's memory the plan may fill: allocator fragmentation, collective buffers
RESERVE_BYTES = 1 * GIB  # per rank, outside the model: interpreter, libraries, device context
IMBALANCE = 0.15  # a rank's share of the global batch may exceed the mean by this much


class PlanError(ValueError):
    """No layout fits; the message names the numbers and the smallest node count that would fit."""


@dataclass(frozen=True)
class DataProfile:
    """What the planner needs of the data: its largest structure and its mean density."""

    largest_atoms: int
    largest_edges: int
    largest_triplets: int
    edges_per_atom: float
    triplets_per_atom: float
    source: str

    @classmethod
    def from_sizes(cls, sizes: np.ndarray, source: str) -> DataProfile:
        """``sizes``: (structures, 3) atoms, edges, triplets (`data_prep.loader.GraphDataset.sizes`); the
        largest structure is the one with the most edges (what a rank's share is balanced on)."""
        sizes = np.atleast_2d(sizes)
        atoms, edges, triplets = (int(v) for v in sizes[int(np.argmax(sizes[:, 1]))])
        total = sizes.sum(axis=0).astype(np.float64)
        return cls(atoms, edges, triplets, total[1] / total[0], total[2] / total[0], source)

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> DataProfile:
        from data_prep.loader import GraphDataset

        return cls.from_sizes(GraphDataset(data_dir, split=None).sizes, f"{data_dir}/manifest.json")


# The bundled sample's largest structure (an alloy cell) and mean density: assumed until data is prepared.
ASSUMED_DATA = DataProfile(1176, 74582, 343960, 46.56, 248.1, "assumed: the bundled sample's largest")


def ghost_atoms(atoms: float, edges: float, cutoff: float, parts: int) -> float:
    """Ghosts of the busiest part when a structure is bisected into ``parts`` (`janus.batching.partition`):
    the atoms within ``cutoff`` outside its cut faces, for a cubic periodic cell of the structure's
    density (its edges per atom fill the cutoff sphere)."""
    if parts == 1 or atoms == 0:
        return 0.0
    density = (edges / atoms) / (4 / 3 * math.pi * cutoff**3)
    box, cut = [(atoms / density) ** (1 / 3)] * 3, [False] * 3
    for _ in range(math.ceil(math.log2(parts))):
        axis = int(np.argmax(box))
        box[axis] /= 2
        cut[axis] = True
    faces = sum(2 * box[(i + 1) % 3] * box[(i + 2) % 3] for i in range(3) if cut[i])
    return min(density * cutoff * faces, atoms * (1 - 1 / parts))


def structure_share(profile: DataProfile, scale: float, graph: int, cutoff: float) -> RankWork:
    """A rank's share of a structure ``scale`` times the largest, cut over ``graph`` ranks."""
    atoms, edges = profile.largest_atoms * scale, profile.largest_edges * scale
    ghosts = ghost_atoms(atoms, edges, cutoff, graph)
    triplets = profile.largest_triplets * scale / graph
    return RankWork(atoms=atoms / graph + ghosts, edges=edges / graph, triplets=triplets, ghosts=ghosts)


def communication_bytes(
    model: ModelConfig, counts: ParameterCounts, parallel: ParallelConfig, atoms: float, ghosts: float,
    dtype: str,
) -> float:  # fmt: skip
    """Bytes a rank sends per step under ``parallel`` (module docstring)."""
    size, world, x = dtype_bytes(dtype), parallel.world_size, parallel.expert
    data = parallel.dp * parallel.graph
    total = 2 * size * (counts.dense * (world - 1) / world + counts.expert / x * (data - 1) / data)
    if x > 1:
        total += 2 * size * counts.expert / x * (x - 1) / x
        total += 3 * 2 * 2 * len(model.moe_blocks) * atoms * model.top_k * model.dim * size * (x - 1) / x
    if parallel.graph > 1:
        total += 3 * 2 * model.num_blocks * ghosts * model.dim * size
    return total


@dataclass
class Candidate:
    parallel: ParallelConfig
    memory: MemoryEstimate  # with the largest structure on the rank
    communication: float
    fits: bool


@dataclass
class Plan:
    """The chosen layout, what it leaves for the batch, and why it was chosen."""

    parallel: ParallelConfig
    memory: MemoryEstimate  # at the batch budget
    capacity: float
    atoms_per_rank: int
    max_atoms_per_batch: int
    max_edges_per_batch: int
    max_triplets_per_batch: int
    largest_structure_atoms: int  # the largest structure (at the data's largest one's density) it takes
    profile: DataProfile
    calibration: Calibration
    candidates: list[Candidate] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def layouts(ranks: int, model: ModelConfig) -> list[ParallelConfig]:
    """Every (dp, graph, expert) with ``dp · graph · expert = ranks`` the model allows."""
    found = []
    for expert in _divisors(ranks):
        if expert > 1 and (not model.moe_blocks or model.num_experts % expert):
            continue
        for graph in _divisors(ranks // expert):
            found.append(ParallelConfig(dp=ranks // (expert * graph), graph=graph, expert=expert))
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def usable(capacity: float) -> float:
    return capacity * HEADROOM - RESERVE_BYTES


def evaluate(
    model: ModelConfig, parallel: ParallelConfig, capacity: float, profile: DataProfile,
    calibration: Calibration, dtype: str, counts: ParameterCounts,
) -> Candidate:  # fmt: skip
    work = structure_share(profile, 1.0, parallel.graph, model.cutoff)
    memory = estimate(model, parallel, work, calibration, dtype, counts)
    # the same atoms a rank in every layout (a rank's batch does not depend on it); ghosts are extra
    comm = communication_bytes(model, counts, parallel, profile.largest_atoms, work.ghosts, dtype)
    return Candidate(parallel, memory, comm, memory.total <= usable(capacity))


def plan_layout(
    model: ModelConfig, ranks: int, capacity: float, profile: DataProfile, calibration: Calibration,
    dtype: str = "float32", fixed: ParallelConfig | None = None,
) -> Plan:  # fmt: skip
    """The layout for ``ranks`` ranks of ``capacity`` bytes each (``fixed``: check that one instead)."""
    counts = parameter_counts(model)
    options = [fixed] if fixed is not None else layouts(ranks, model)
    candidates = [evaluate(model, p, capacity, profile, calibration, dtype, counts) for p in options]
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise PlanError(_nothing_fits(model, ranks, capacity, profile, candidates))
    best = min(fitting, key=lambda c: (c.communication, c.parallel.graph, c.parallel.expert))
    plan = _budget(model, best, capacity, profile, calibration, dtype, counts)
    plan.candidates = candidates
    plan.reasons = _reasons(best, candidates, capacity, fixed is not None)
    return plan


def _budget(
    model: ModelConfig, best: Candidate, capacity: float, profile: DataProfile, calibration: Calibration,
    dtype: str, counts: ParameterCounts,
) -> Plan:  # fmt: skip
    """Atoms a rank can hold at the data's mean density in what the layout's state leaves free."""
    p = best.parallel
    free = usable(capacity) - best.memory.state - calibration.constant
    per_atom = model.num_blocks * (
        calibration.per_atom
        + calibration.per_edge * profile.edges_per_atom
        + calibration.per_triplet * profile.triplets_per_atom
    )
    atoms_per_rank = max(1, int(free / per_atom))
    work = RankWork(atoms_per_rank, atoms_per_rank * profile.edges_per_atom,
                    atoms_per_rank * profile.triplets_per_atom)  # fmt: skip
    memory = estimate(model, p, work, calibration, dtype, counts)
    global_atoms = max(profile.largest_atoms, int(atoms_per_rank * p.world_size / (1 + IMBALANCE)))
    return Plan(
        parallel=p, memory=memory, capacity=capacity, atoms_per_rank=atoms_per_rank,
        max_atoms_per_batch=global_atoms,
        max_edges_per_batch=max(profile.largest_edges, int(global_atoms * profile.edges_per_atom)),
        max_triplets_per_batch=max(profile.largest_triplets, int(global_atoms * profile.triplets_per_atom)),
        largest_structure_atoms=_largest_fitting(model, p, capacity, profile, calibration, dtype, counts),
        profile=profile, calibration=calibration,
    )  # fmt: skip


def _largest_fitting(
    model: ModelConfig, parallel: ParallelConfig, capacity: float, profile: DataProfile,
    calibration: Calibration, dtype: str, counts: ParameterCounts,
) -> int:  # fmt: skip
    """Atoms of the largest structure (scaled from the data's largest) a graph group of the layout takes."""

    def fits(scale: float) -> bool:
        work = structure_share(profile, scale, parallel.graph, model.cutoff)
        return estimate(model, parallel, work, calibration, dtype, counts).total <= usable(capacity)

    low, high = 0.0, 1.0
    while fits(high) and high < 1e9:
        low, high = high, high * 2
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return int(low * profile.largest_atoms)


def _reasons(best: Candidate, candidates: list[Candidate], capacity: float, fixed: bool) -> list[str]:
    if fixed:
        return ["layout given in the run config; checked against memory"]
    p = best.parallel
    fitting = [c for c in candidates if c.fits]
    lines = [
        f"{len(fitting)} of {len(candidates)} layouts fit {capacity / GIB:.1f} GiB per rank with the "
        f"largest structure; dp={p.dp} graph={p.graph} expert={p.expert} communicates least "
        f"({best.communication / 2**20:,.1f} MiB per rank and step)"
    ]
    narrower = [c for c in candidates if c.parallel.graph < p.graph]
    if p.graph > 1 and narrower and not any(c.fits for c in narrower):
        lines.append(f"graph={p.graph}: the largest structure does not fit a narrower graph group")
    elif p.graph == 1:
        lines.append("graph=1: the largest structure fits one rank")
    return lines


def _nothing_fits(
    model: ModelConfig, ranks: int, capacity: float, profile: DataProfile, candidates: list[Candidate]
) -> str:
    leanest = min(candidates, key=lambda c: c.memory.state)
    least = min(candidates, key=lambda c: c.memory.total)
    if leanest.memory.state > usable(capacity):
        p = leanest.parallel
        cause = (
            f"model {model.preset!r}'s parameters, gradients and AdamW state alone need "
            f"{leanest.memory.state / GIB:.1f} GiB per rank even at dp={p.dp} graph={p.graph} "
            f"expert={p.expert}"
        )
    else:
        p, state = least.parallel, least.memory.state
        where = f"at its least-memory layout dp={p.dp} graph={p.graph} expert={p.expert}"
        cause = (
            f"with the largest structure ({profile.largest_atoms} atoms, {profile.largest_edges} edges, "
            f"{profile.largest_triplets} triplets; {profile.source}) model {model.preset!r} needs "
            f"{least.memory.total / GIB:.1f} GiB per rank {where} ({state / GIB:.1f} GiB of state)"
        )
    return (
        f"no layout of {ranks} rank(s) fits: {cause}, more than the {usable(capacity) / GIB:.1f} GiB a "
        f"rank may use ({HEADROOM:.0%} of {capacity / GIB:.1f} GiB less a "
        f"{RESERVE_BYTES / GIB:.0f} GiB reserve)"
    )


def smallest_ranks(
    model: ModelConfig, ranks_per_node: int, capacity: float, profile: DataProfile, calibration: Calibration,
    dtype: str = "float32", max_nodes: int = 16384,
) -> int | None:  # fmt: skip
    """The fewest nodes whose ranks admit a fitting layout (None: not up to ``max_nodes``): doubling to a
    count that fits, then bisection (more ranks shard the state thinner and widen the graph groups)."""
    counts = parameter_counts(model)

    def fits(nodes: int) -> bool:
        options = layouts(nodes * ranks_per_node, model)
        return any(evaluate(model, p, capacity, profile, calibration, dtype, counts).fits for p in options)

    low, high = 0, 1
    while not fits(high):
        if high >= max_nodes:
            return None
        low, high = high, min(2 * high, max_nodes)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def main(argv: list[str] | None = None) -> int:
    """``python -m janus.layout --preset moe-s --ranks 4 --memory-gib 5.5 [--data DIR] [--model KEY=VALUE]``:
    the plan for ranks of that much memory each, with this machine's (``local``) calibration."""
    import argparse
    import json

    import yaml

    from janus.memory import load_calibrations

    parser = argparse.ArgumentParser(prog="python -m janus.layout", description=main.__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--memory-gib", type=float, required=True, help="memory of one rank")
    parser.add_argument("--data", type=Path, help="prepared data (default: the bundled sample's largest)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="model override")
    parser.add_argument("--site", default="local", help="whose calibration to use")
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.model)}
    model = ModelConfig.from_preset(args.preset, **overrides)
    calibration = load_calibrations(args.site).get(args.preset)
    if calibration is None:
        print(f"no calibration of {args.preset!r} for {args.site!r}: run python -m janus.memory calibrate")
        return 2
    profile = DataProfile.from_data_dir(args.data) if args.data else ASSUMED_DATA
    try:
        plan = plan_layout(model, args.ranks, args.memory_gib * GIB, profile, calibration)
    except PlanError as err:
        print(err)
        return 1
    summary = {
        "layout": plan.parallel.model_dump(exclude={"auto"}),
        "memory_gib": {k: round(v / GIB, 3) for k, v in plan.memory.components().items()},
        "atoms_per_rank": plan.atoms_per_rank,
        "max_atoms_per_batch": plan.max_atoms_per_batch,
        "largest_structure_atoms": plan.largest_structure_atoms,
        "why": plan.reasons,
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
