"""A complete request from a partial one: ranks per node, block size, layout and batch budget.

``parsl-run ... --site frontier --set launch.nodes=64`` is enough: ranks per node come from the site's
GPUs (``site.gpus_per_node``; one rank per node on a CPU site), the training block from the nodes asked
for (``site.nodes_per_block``), and, unless a ``parallel.*`` key is given, the layout from the memory
planner (`janus.layout`), which also sets the batch budget on a site that declares its device memory
when no ``train.max_*_per_batch`` key is given (a scaling ladder: for its smallest rung; each rung is
planned again for its own ranks, `workflows.scaling.rung_parallel`). Values given explicitly (run config
file, ``--set``, the per-user sites file) win and are validated as before, the layout against memory
too. A request that cannot fit fails here, before anything is submitted, with the numbers and the
smallest node count that would fit. `report` is the plan ``--dry-run`` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

import site_configs
from janus import layout, memory
from janus.config import ParallelConfig, TrainConfig
from janus.overrides import ConfigError, build, check_path, load_yaml, parse_assignment, set_in
from site_configs.schema import SiteConfig
from workflows.rundir import RunPaths, flatten

BUDGET_KEYS = ("train.max_atoms_per_batch", "train.max_edges_per_batch", "train.max_triplets_per_batch")


@dataclass
class Request:
    """The validated run config and site, and the plan that completed them (None: not memory-checked)."""

    run: Any
    site: SiteConfig
    plan: layout.Plan | None
    note: str = ""


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def given_keys(config_file: Path | None, assignments: list[str]) -> set[str]:
    """Dotted keys (and their parents) the user set, in the config file or with ``--set``."""
    paths = []
    if config_file is not None:
        paths += [key.split(".") for key in flatten(load_yaml(config_file))]
    paths += [parse_assignment(text)[0] for text in assignments]
    return {".".join(path[:depth]) for path in paths for depth in range(1, len(path) + 1)}


def resolve_request(
    schema: type[BaseModel], config_file: Path | None, assignments: list[str], site_name: str,
    sites_file: Path | None, run_dir: Path,
) -> Request:  # fmt: skip
    from workflows.runconfig import SiteFields

    data = schema().model_dump(mode="json", exclude={"site"})
    if config_file is not None:
        data = deep_merge(data, load_yaml(config_file))
    for text in assignments:
        path, value = parse_assignment(text)
        check_path(schema, path)
        set_in(data, path, value)
    given = given_keys(config_file, assignments)
    try:
        fields = SiteFields.model_validate(data.get("site") or {}).given()
    except ValidationError as err:
        raise ConfigError(f"site: {err}") from None
    ladder = data.get("scaling", {}).get("nodes", [])
    if ladder and "launch.nodes" not in given:
        data["launch"]["nodes"] = min(ladder)  # a ladder's run config is its smallest rung's
    nodes = max([data["launch"]["nodes"], *ladder])
    site = _site(site_name, fields, sites_file, nodes)
    if "launch.ranks_per_node" not in given and site.gpus_per_node:
        data["launch"]["ranks_per_node"] = site.gpus_per_node
    auto = data.get("parallel") == "auto" or not any(k.split(".")[0] == "parallel" for k in given)
    ranks = data["launch"]["nodes"] * data["launch"]["ranks_per_node"]
    if auto:
        data["parallel"] = {"dp": ranks, "graph": 1, "expert": 1, "auto": True}
    run = build(schema, data, [])
    request = plan_request(run, site, RunPaths(run_dir).data, fixed=None if auto else run.parallel)
    if request.plan is not None and auto:
        data["parallel"] = {**request.plan.parallel.model_dump(), "auto": True}
        if site.device_memory_gib and not given.intersection(BUDGET_KEYS):
            data["train"].update(budget(request.plan, request.run.train))
        request.run = build(schema, data, [])
    return request


def _site(name: str, fields: dict[str, Any], sites_file: Path | None, nodes: int) -> SiteConfig:
    """The site, with its training block as large as the request unless a value was given for it."""
    path = (sites_file or site_configs.user_file()).expanduser()
    if "nodes_per_block" not in fields and "nodes_per_block" not in site_configs.user_overrides(name, path):
        fields = {**fields, "nodes_per_block": nodes}
    try:
        site = site_configs.resolve(name, fields, sites_file)
        site_configs.require_monitoring(site)
        return site
    except (ValidationError, ValueError) as err:
        raise ConfigError(f"site {name!r}: {err}") from err


def budget(plan: layout.Plan, train: TrainConfig) -> dict[str, int]:
    """The configured batch budget, lowered to what the layout's memory takes, never raised: the batch is
    also the optimiser's (the learning rate scales with its square root), and a budget that fills a GPU
    can exceed the whole training set; the plan prints what memory would allow."""

    def capped(given: int | None, limit: int) -> int:
        return limit if given is None else min(given, limit)

    return {
        "max_atoms_per_batch": capped(train.max_atoms_per_batch, plan.max_atoms_per_batch),
        "max_edges_per_batch": capped(train.max_edges_per_batch, plan.max_edges_per_batch),
        "max_triplets_per_batch": capped(train.max_triplets_per_batch, plan.max_triplets_per_batch),
    }


def capacity_bytes(site: SiteConfig, ranks_per_node: int) -> float:
    """A rank's memory: its GPU's, or its share of the node's on a CPU site."""
    if site.gpus_per_node:
        if site.device_memory_gib is None:
            raise ConfigError(f"site.device_memory_gib is not set for {site.name}, which has GPUs")
        return site.device_memory_gib * memory.GIB
    node = site.device_memory_gib * memory.GIB if site.device_memory_gib else _this_machine_bytes()
    return node / ranks_per_node


def _this_machine_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibration_for(preset: str, site: SiteConfig) -> tuple[memory.Calibration | None, str]:
    """The site's calibration of ``preset``, else this machine's ('local'), with a note saying so."""
    own = memory.load_calibrations(site.name).get(preset)
    if own is not None:
        return own, f"activation coefficients measured on {site.name} ({own.device}, {own.date})"
    local = memory.load_calibrations("local").get(preset)
    command = f"python -m janus.memory calibrate --preset {preset} --site {site.name} --data DIR"
    if local is not None:
        return local, (
            f"activation coefficients measured on local ({local.device}, {local.date}), not on "
            f"{site.name}: run `{command}` on a {site.name} node for its own"
        )
    return None, f"no memory calibration of preset {preset!r}: run `{command}`; layout not memory-checked"


def plan_request(run: Any, site: SiteConfig, data_dir: Path, fixed: ParallelConfig | None) -> Request:
    """Plan (or, with ``fixed``, check) the layout of ``run`` on ``site``; `ConfigError` if none fits."""
    model = run.model.resolve()
    calibration, note = calibration_for(model.preset, site)
    if calibration is None:
        return Request(run, site, None, note)
    if (data_dir / "manifest.json").is_file():
        profile = layout.DataProfile.from_data_dir(data_dir)
    else:
        profile = layout.ASSUMED_DATA
    rpn = run.launch.ranks_per_node
    capacity = capacity_bytes(site, rpn)
    dtype = run.train.dtype
    try:
        plan = layout.plan_layout(model, run.launch.ranks, capacity, profile, calibration, dtype, fixed)
    except layout.PlanError as err:
        nodes = layout.smallest_ranks(model, rpn, capacity, profile, calibration, dtype)
        if site.scheduler == "local":
            hint = f" (this machine is one node; {nodes} nodes would fit)" if nodes else ""
        elif nodes is not None:
            hint = f"; the smallest node count that fits is {nodes} (launch.nodes={nodes})"
        else:
            hint = "; no node count fits: the largest structure is too large for any graph group"
        raise ConfigError(f"{err}{hint}") from None
    return Request(run, site, plan, note)


def report(request: Request) -> str:
    """The plan as ``--dry-run`` prints it."""
    run, plan = request.run, request.plan
    p = run.parallel
    head = (
        f"layout plan: {run.launch.nodes} node(s) × {run.launch.ranks_per_node} rank(s) = {run.launch.ranks} "
        f"ranks, model {run.model.preset}, dp={p.dp} graph={p.graph} expert={p.expert}"
        f"{' (planned)' if p.auto else ' (given)'}"
    )
    if plan is None:
        return f"{head}\n  {request.note}"
    gib = memory.GIB
    usable = layout.usable(plan.capacity)
    lines = [head, *(f"  why: {reason}" for reason in plan.reasons)]
    lines.append(
        f"  per-rank memory at the largest batch it allows ({plan.atoms_per_rank} atoms a rank), against "
        f"{plan.capacity / gib:.1f} GiB ({usable / gib:.1f} GiB usable):"
    )
    for name, value in plan.memory.components().items():
        lines.append(f"    {name:24s} {value / gib:9.3f} GiB")
    lines.append(f"    {'total':24s} {plan.memory.total / gib:9.3f} GiB")
    t = run.train
    lines += [
        f"  batch budget: train.max_atoms_per_batch={t.max_atoms_per_batch} "
        f"max_edges_per_batch={t.max_edges_per_batch} max_triplets_per_batch={t.max_triplets_per_batch}"
        f" (memory allows up to {plan.max_atoms_per_batch} atoms: raise train.max_atoms_per_batch toward it "
        "to fill the devices)",
        f"  largest structure it takes: {plan.largest_structure_atoms} atoms (data's largest: "
        f"{plan.profile.largest_atoms} atoms, {plan.profile.largest_edges} edges, "
        f"{plan.profile.largest_triplets} triplets; {plan.profile.source})",
        f"  {request.note}",
    ]
    return "\n".join(lines)
