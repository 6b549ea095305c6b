"""Nightly scaling ladder: weak and strong scaling rungs, efficiency history, regression verdict.

    parsl-run workflows/scaling.py --site NAME [--run-dir DIR] [--set scaling.nodes=[1,2,4]]
                                   [--set scaling.steps=K] [--schedule nightly | --unschedule]

Each rung is a short training job through the same launch path as pretraining (the site's launcher, the
same `janus.train`), run one after another so rungs do not disturb each other. Weak scaling keeps the work
per rank fixed (the global atom budget grows with the ranks); strong scaling keeps the global batch fixed.
Warm-up steps are excluded from timing. Results go to ``DIR/results/``: ``history.sqlite`` (every rung of
every run, keyed by site, commit, preset, layout and date), ``report.md`` and PNG plots of the latest run,
with a copy per run under ``results/<run id>/``. A rung whose efficiency or per-rank throughput falls more
than ``scaling.tolerance`` below the median of its last ``scaling.baseline_runs`` healthy runs is a
regression: the command exits with status 3 and names the rung.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from janus.config import ParallelConfig
from janus.metrics import read as read_metrics
from janus.metrics import training_records
from matris.io import write_atomic
from site_configs.schema import SiteConfig
from workflows import history
from workflows.plan import plan_request
from workflows.runconfig import LaunchConfig, RunConfig, Strict

REGRESSION_EXIT = 3


class ScalingSection(Strict):
    modes: list[Literal["weak", "strong"]] = Field(default_factory=lambda: ["weak", "strong"], min_length=1)
    nodes: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    steps: int = Field(8, ge=2, description="training steps per rung, warm-up included")
    warmup_steps: int = Field(2, ge=0)
    atoms_per_rank: int = Field(256, ge=1, description="weak scaling: atom budget per rank and step")
    global_atoms: int = Field(1024, ge=1, description="strong scaling: atom budget of the global batch")
    tolerance: float = Field(0.10, gt=0, lt=1, description="allowed fractional drop below the baseline")
    baseline_runs: int = Field(5, ge=1, description="rolling baseline: median of this many past runs")
    inject_sleep_s: float = Field(0.0, ge=0, description="extra sleep per training step (tests detection)")
    inject_nodes: int | None = Field(None, description="rung (node count) that gets the sleep; None = all")
    schedule_time: str = Field("30 2 * * *", description="cron time fields of the nightly run")

    @field_validator("nodes")
    @classmethod
    def _ascending(cls, nodes: list[int]) -> list[int]:
        if any(n < 1 for n in nodes) or sorted(set(nodes)) != nodes:
            raise ValueError(
                f"scaling.nodes must be distinct positive counts in ascending order, got {nodes}"
            )
        return nodes

    @field_validator("schedule_time")
    @classmethod
    def _cron(cls, text: str) -> str:
        fields = text.split()
        if len(fields) != 5 or not all(set(f) <= set("0123456789*/,-") for f in fields):
            raise ValueError(
                f"scaling.schedule_time {text!r} must be five cron time fields, e.g. '30 2 * * *'"
            )
        return text

    @model_validator(mode="after")
    def _warmup(self) -> ScalingSection:
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"scaling.warmup_steps ({self.warmup_steps}) must be below scaling.steps ({self.steps})"
            )
        return self


class ScalingConfig(RunConfig):
    scaling: ScalingSection = Field(default_factory=ScalingSection)

    @model_validator(mode="after")
    def _layout_fits_every_rung(self) -> ScalingConfig:
        per_group = self.parallel.graph * self.parallel.expert
        for nodes in self.scaling.nodes:
            ranks = nodes * self.launch.ranks_per_node
            if ranks % per_group:
                raise ValueError(
                    f"scaling.nodes: {nodes} node(s) × launch.ranks_per_node {self.launch.ranks_per_node} = "
                    f"{ranks} ranks is not a multiple of parallel.graph × parallel.expert = {per_group}"
                )
        return self


CONFIG = ScalingConfig


@dataclass(frozen=True)
class Rung:
    mode: str
    nodes: int
    ranks_per_node: int

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def name(self) -> str:
        return f"{self.mode}-n{self.nodes}"


def ladder(cfg: ScalingConfig) -> list[Rung]:
    return [Rung(mode, n, cfg.launch.ranks_per_node) for mode in cfg.scaling.modes for n in cfg.scaling.nodes]


def rung_parallel(cfg: ScalingConfig, rung: Rung, site: SiteConfig, data_dir: Path) -> ParallelConfig:
    """The rung's layout: planned for its ranks (`workflows.plan`) when the run's layout is ``auto``, else
    the run's graph and expert groups with the remaining ranks data-parallel."""
    if cfg.parallel.auto:
        launch = LaunchConfig(nodes=rung.nodes, ranks_per_node=rung.ranks_per_node)
        request = plan_request(cfg.model_copy(update={"launch": launch}), site, data_dir, fixed=None)
        if request.plan is not None:
            return request.plan.parallel.model_copy(update={"auto": True})
        return ParallelConfig(dp=rung.ranks, auto=True)
    dp = rung.ranks // (cfg.parallel.graph * cfg.parallel.expert)
    return cfg.parallel.model_copy(update={"dp": dp})


def rung_janus_config(cfg: ScalingConfig, rung: Rung, parallel: ParallelConfig, data_dir: Path,
                      out_dir: Path) -> dict:  # fmt: skip
    s = cfg.scaling
    budget = s.atoms_per_rank * rung.ranks if rung.mode == "weak" else s.global_atoms
    injected = s.inject_sleep_s if s.inject_nodes in (None, rung.nodes) else 0.0
    train = cfg.train.model_copy(
        update={
            "steps": s.steps,
            "warmup_steps": min(cfg.train.warmup, s.steps - 1),
            "checkpoint_every": s.steps,
            "keep_checkpoints": 1,
            "max_atoms_per_batch": budget,
            "sleep_per_step_s": injected,
            "eval_every": 0,  # rungs time steps; what the model learns is the pretraining run's concern
        }
    )
    return cfg.janus_config(data_dir, out_dir, train=train, parallel=parallel)


def layout_name(cfg: ScalingConfig) -> str:
    if cfg.parallel.auto:
        return f"rpn{cfg.launch.ranks_per_node}-auto"
    return f"rpn{cfg.launch.ranks_per_node}-g{cfg.parallel.graph}-e{cfg.parallel.expert}"


def describe(ctx) -> str:
    cfg: ScalingConfig = ctx.run
    lines = [
        f"scaling ladder on site {ctx.site.name!r}; run directory {ctx.run_dir}",
        f"  data    → {ctx.run_dir / 'data'} (prepared once, reused every night)",
    ]
    for rung in ladder(cfg):
        config_file = ctx.run_dir / "runs" / "RUN_ID" / rung.name / "janus.yaml"
        command = ctx.site_module.train_command(ctx.site, rung.nodes, rung.ranks_per_node, config_file)
        p = rung_parallel(cfg, rung, ctx.site, ctx.run_dir / "data")
        lines.append(
            f"  {rung.name:10s} {rung.nodes} node(s) × {rung.ranks_per_node} rank(s), "
            f"dp={p.dp} graph={p.graph} expert={p.expert}{' (planned)' if p.auto else ''}, "
            f"{cfg.scaling.steps} steps"
        )
        lines.append(f"      $ {command}")
    lines.append(
        f"  report  → {ctx.run_dir / 'results'}/report.md, efficiency.png, throughput.png, history.sqlite"
    )
    return "\n".join(lines)


def run(ctx) -> int:
    import parsl

    from workflows import stages

    cfg: ScalingConfig = ctx.run
    root = ctx.run_dir
    run_id = time.strftime("%Y%m%dT%H%M%S")
    run_root = root / "runs" / run_id
    rungs = ladder(cfg)
    parsl.load(ctx.site_module.parsl_config(ctx.site, root))
    try:
        _, manifest = stages.submit_data(cfg.data, root / "data")
        previous = manifest
        futures = []
        for rung in rungs:
            out_dir = run_root / rung.name
            out_dir.mkdir(parents=True, exist_ok=True)
            config_file = out_dir / "janus.yaml"
            parallel = rung_parallel(cfg, rung, ctx.site, root / "data")
            write_atomic(
                config_file,
                yaml.safe_dump(rung_janus_config(cfg, rung, parallel, root / "data", out_dir)),
            )
            command = ctx.site_module.train_command(ctx.site, rung.nodes, rung.ranks_per_node, config_file)
            launch = LaunchConfig(nodes=rung.nodes, ranks_per_node=rung.ranks_per_node)
            # Chained after the previous rung (its output is this one's input): rungs never overlap.
            previous = stages.submit_train(
                ctx, command, out_dir, previous, f"scaling-{run_id}-{rung.name}", launch
            )
            futures.append((rung, previous))
        for rung, future in futures:
            try:
                future.result()
            except Exception as err:
                log = run_root / rung.name / "train.err"
                tail = log.read_text().strip().splitlines()[-6:] if log.exists() else []
                print(f"parsl-run: scaling rung {rung.name} failed: {err}\n    " + "\n    ".join(tail))
                return 1
    finally:
        parsl.dfk().cleanup()

    results = [
        measure(rung, run_root / rung.name / "metrics.jsonl", cfg.scaling.warmup_steps) for rung in rungs
    ]
    add_efficiency(results)
    key = history.RunKey(
        site=ctx.site.name, commit=history.git_commit(), preset=cfg.model.preset, layout=layout_name(cfg)
    )
    store = history.History(root / "results" / "history.sqlite")
    verdicts = store.judge(key, results, cfg.scaling.baseline_runs, cfg.scaling.tolerance)
    store.append(key, run_id, results, verdicts)
    report_dir = root / "results" / run_id
    text = history.write_report(report_dir, key, run_id, results, verdicts, store.trend(key))
    for name in ("report.md", "efficiency.png", "throughput.png"):
        write_atomic(root / "results" / name, (report_dir / name).read_bytes())
    print(text)
    regressions = [v for v in verdicts.values() if v.regression]
    for verdict in regressions:
        print(f"parsl-run: REGRESSION in rung {verdict.rung}: {verdict.reason}")
    return REGRESSION_EXIT if regressions else 0


def measure(rung: Rung, metrics_path: Path, warmup: int) -> history.RungResult:
    """Timing of the steps after warm-up; throughput from atoms per step over the median step time."""
    records = training_records(read_metrics(metrics_path))
    timed = [r for r in records if r["step"] > warmup]
    times = [r["step_time_s"] for r in timed]
    median = statistics.median(times)
    atoms = statistics.median(r["atoms"] for r in timed)
    flop = [r["flop_efficiency"] for r in timed if r.get("flop_efficiency") is not None]
    comm = [r["comm_fraction"] for r in timed if r.get("comm_fraction") is not None]
    return history.RungResult(
        mode=rung.mode,
        nodes=rung.nodes,
        ranks=rung.ranks,
        step_time_median=median,
        step_time_spread=max(times) - min(times),
        atoms_per_s=atoms / median,
        per_rank_atoms_per_s=atoms / median / rung.ranks,
        flop_efficiency=statistics.median(flop) if flop else None,
        comm_fraction=statistics.median(comm) if comm else None,
        peak_memory_bytes=max(r.get("peak_memory_bytes", 0) for r in records),
    )


def add_efficiency(results: list[history.RungResult]) -> None:
    """Weak: per-rank throughput relative to the smallest rung. Strong: T(b)·b / (N·T(N))."""
    for mode in {r.mode for r in results}:
        rungs = sorted((r for r in results if r.mode == mode), key=lambda r: r.nodes)
        base = rungs[0]
        for r in rungs:
            if mode == "weak":
                r.efficiency = r.per_rank_atoms_per_s / base.per_rank_atoms_per_s
            else:
                r.efficiency = base.step_time_median * base.ranks / (r.ranks * r.step_time_median)


def schedule(ctx, action: str) -> int:
    """``--schedule nightly`` / ``--unschedule``: the site's own mechanism, idempotent."""
    from workflows import nightly

    return nightly.apply(ctx, action)
