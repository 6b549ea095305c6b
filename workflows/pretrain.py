"""Pretraining DAG: prepare data → train → export → evaluate.

    parsl-run workflows/pretrain.py --site local [--run-dir DIR] [--set key.path=value ...]

Data preparation runs one Parsl app per input chunk, then one that writes the manifest; training is one
bash app that starts every rank through the site's launcher; export consolidates the sharded checkpoint
into the deployable model; evaluation scores that exported model on the held-out split, so the numbers
describe the artifact users load. Rerunning the same command with the same run directory resumes: cached
apps are skipped (Parsl checkpoints in ``RUN_DIR/runinfo``), each stage re-checks its outputs, and a
killed training continues from its last checkpoint. While it runs, the console shows each stage's progress
(`workflows.progress`) and ``summary.json`` is rewritten as each stage starts and ends, for
``parsl-run status`` (`workflows.status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from matris.io import write_atomic
from workflows.runconfig import RunConfig
from workflows.rundir import RunPaths, check_resume, exclusive, set_aside_unreadable_memos

CONFIG = RunConfig
STAGES = ("data", "train", "export", "evaluate")


def fingerprint(*sections: Any) -> str:
    """Cache key of a stage: the config sections its outputs depend on."""
    text = json.dumps(
        [s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in sections], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_command(ctx, paths: RunPaths) -> str:
    launch = ctx.run.launch
    return ctx.site_module.train_command(ctx.site, launch.nodes, launch.ranks_per_node, paths.janus_config)


def describe(ctx) -> str:
    run: RunConfig = ctx.run
    paths = RunPaths(ctx.run_dir)
    sources = "\n".join(f"      - {s}" for s in run.data.sources)
    lines = [
        f"pretrain DAG on site {ctx.site.name!r} (scheduler: {ctx.site.scheduler})",
        f"run directory {paths.root}",
        "",
        f"  1. data      [stages] one app per input chunk → {paths.data}/"
        " (shards, manifest.json, quarantine.jsonl)",
        sources,
        f"  2. train     [train] {run.launch.nodes} node(s) × {run.launch.ranks_per_node} rank(s), "
        f"layout dp={run.parallel.dp} graph={run.parallel.graph} expert={run.parallel.expert}, "
        f"model {run.model.preset}, {run.train.steps} steps → {paths.train}/",
        f"       $ {train_command(ctx, paths)}",
        f"  3. export    [stages] newest checkpoint → {paths.model}",
        f"  4. evaluate  [stages] held-out split → {paths.eval}/metrics.json",
    ]
    if ctx.site_module.describe_submission is not None:
        lines += ["", ctx.site_module.describe_submission(ctx.site, run, paths)]
    return "\n".join(lines)


@dataclass
class StageRecord:
    status: str = "pending"
    start: float | None = None
    end: float | None = None
    outputs: list[str] = field(default_factory=list)
    detail: str = ""


def check(ctx) -> None:
    """Before Parsl starts: the run directory may be resumed with this run config."""
    check_resume(RunPaths(ctx.run_dir), ctx.run.model_dump(mode="json"), ctx.extend)


def run(ctx) -> int:
    with exclusive(RunPaths(ctx.run_dir)):
        check(ctx)  # again under the lock: another run may have finished in between
        return _run(ctx)


def _run(ctx) -> int:
    import parsl

    from workflows import stages
    from workflows.progress import live_progress
    from workflows.report import print_evaluation, print_stage_table

    run_cfg: RunConfig = ctx.run
    paths = RunPaths(ctx.run_dir)
    for folder in (paths.data, paths.train, paths.export, paths.eval):
        folder.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.run_config, yaml.safe_dump(run_cfg.model_dump(mode="json")))
    write_atomic(paths.janus_config, yaml.safe_dump(run_cfg.janus_config(paths.data, paths.train)))

    damaged = stages.data_problem(paths.data) if (paths.data / "manifest.json").exists() else None
    if damaged:
        print(f"parsl-run: data: {damaged}; preparing the data again", flush=True)
    model_damage = stages.export_problem(paths.model) if paths.model.exists() else None
    if model_damage:
        print(f"parsl-run: export: {model_damage}; exporting again", flush=True)
    complete_before = {
        "data": damaged is None and stages.data_complete(paths.data),
        "train": stages.train_complete(paths.train, run_cfg.train.steps),
        "export": stages.export_complete(paths.model, paths.train),
        "evaluate": stages.eval_complete(paths.eval, paths.model),
    }
    records = {name: StageRecord() for name in STAGES}
    for line in set_aside_unreadable_memos(paths):
        print(f"parsl-run: {line}", flush=True)
    dfk = parsl.load(ctx.site_module.parsl_config(ctx.site, paths.root))
    failed, state = None, "interrupted"

    def report() -> None:
        write_summary(paths, records, ctx, "running", dfk.run_dir)

    try:
        report()
        with live_progress(paths.root):
            failed = wait(submit(ctx, paths), records, complete_before, paths, run_cfg, STAGES, report)
            stale = [name for name in STAGES if records[name].status == "stale"]
            if stale and failed is None:
                print(f"parsl-run: cached results of {', '.join(stale)} no longer match their outputs; "
                      "rerunning", flush=True)  # fmt: skip
                again = STAGES[STAGES.index(stale[0]) :]
                futures = submit(ctx, paths, salt=time.time_ns(), rerun_from=stale[0])
                failed = wait(futures, records, complete_before, paths, run_cfg, again, report)
        state = "failed" if failed else "finished"
    finally:
        dfk.cleanup()
        write_summary(paths, records, ctx, state, dfk.run_dir)
    print_stage_table(records)
    if failed:
        print(f"parsl-run: stage {failed!r} failed: {records[failed].detail}")
        print(f"parsl-run: fix the cause and rerun the same command to resume ({paths.summary})")
        return 1
    print_evaluation(paths.eval / "metrics.json")
    return 0


def submit(ctx, paths: RunPaths, salt: int = 0, rerun_from: str | None = None) -> dict[str, list]:
    """Submit the whole DAG. Each app's cache key holds the config its outputs depend on; stages from
    ``rerun_from`` on also get ``salt``, so Parsl cannot answer them from its checkpoint again."""
    from parsl.data_provider.files import File

    from workflows import stages

    run_cfg: RunConfig = ctx.run
    late = set(STAGES[STAGES.index(rerun_from) :]) if rerun_from else set()
    attempt = {name: salt if name in late else 0 for name in STAGES}
    train_key = fingerprint(run_cfg.data, run_cfg.model, run_cfg.loss, run_cfg.train, run_cfg.parallel)
    chunks, manifest = stages.submit_data(run_cfg.data, paths.data, attempt["data"])
    trained = stages.submit_train(
        ctx, train_command(ctx, paths), paths.train, manifest, train_key, run_cfg.launch, attempt["train"]
    )
    exported = stages.export(
        str(paths.train / "checkpoints"), str(paths.model), str(paths.data), key=train_key,
        attempt=attempt["export"],
        inputs=[trained.outputs[0]], outputs=[File(str(paths.model))],
    )  # fmt: skip
    evaluated = stages.evaluate(
        str(paths.model), str(paths.data), str(paths.eval), run_cfg.eval.model_dump(mode="json"),
        key=train_key, attempt=attempt["evaluate"], inputs=[exported.outputs[0]],
        outputs=[File(str(paths.eval / "metrics.json"))],
    )  # fmt: skip
    return {"data": [*chunks, manifest], "train": [trained], "export": [exported], "evaluate": [evaluated]}


def wait(futures: dict[str, list], records: dict[str, StageRecord], complete_before: dict[str, bool],
         paths: RunPaths, run_cfg: RunConfig, recorded: tuple[str, ...],
         report: Callable[[], None]) -> str | None:  # fmt: skip
    """Wait stage by stage; record how the ``recorded`` stages ended, calling ``report`` as each starts
    and ends. Returns the first failed stage."""
    from workflows import stages

    verify = {
        "data": lambda: stages.data_complete(paths.data),
        "train": lambda: stages.train_complete(paths.train, run_cfg.train.steps),
        "export": lambda: stages.export_complete(paths.model, paths.train),
        "evaluate": lambda: stages.eval_complete(paths.eval, paths.model),
    }
    outputs = {
        "data": [paths.data / "manifest.json", paths.data / "quarantine.jsonl"],
        "train": [paths.train / "checkpoints", paths.train / "metrics.jsonl"],
        "export": [paths.model],
        "evaluate": [paths.eval / "metrics.json"],
    }
    for name in STAGES:
        record = records[name] if name in recorded else StageRecord()
        if name in recorded:
            record.status, record.start = "running", time.time()
            report()
        try:
            for future in futures[name]:
                future.result()
        except Exception as err:  # a Parsl app failure: report it, stop waiting
            record.status, record.detail = "failed", _describe_failure(err, paths, name)
            record.start, record.end = _times(futures[name])
            records[name] = record
            return name
        record.start, record.end = _times(futures[name])
        record.outputs = [str(p) for p in outputs[name]]
        if name == "data":
            for warning in json.loads((paths.data / "manifest.json").read_text()).get("warnings", []):
                print(f"parsl-run: data: {warning}", flush=True)
        memoized = all(f.task_record["from_memo"] for f in futures[name])
        if memoized and not verify[name]():
            record.status = "stale"
        elif memoized:
            record.status = "skipped (Parsl checkpoint)"
        elif complete_before[name]:
            record.status = "skipped (outputs verified)"
        else:
            record.status = "ran"
        if name in recorded:
            report()
    return None


def _times(futures: list) -> tuple[float | None, float | None]:
    starts = [f.task_record["try_time_launched"] or f.task_record["time_invoked"] for f in futures
              if f.task_record.get("time_invoked")]  # fmt: skip
    ends = [f.task_record["time_returned"] for f in futures if f.task_record.get("time_returned")]
    return (min(starts).timestamp() if starts else None, max(ends).timestamp() if ends else None)


def _describe_failure(err: Exception, paths: RunPaths, name: str) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    if name == "train":
        log = paths.train / "train.err"
        tail = log.read_text().strip().splitlines()[-8:] if log.exists() else []
        text += "\n    " + "\n    ".join(tail) + f"\n    (full log: {log})"
    return text


def write_summary(
    paths: RunPaths, records: dict[str, StageRecord], ctx, state: str, parsl_run_dir: str
) -> None:
    """``summary.json``: the run's ``state`` (running, finished, failed, interrupted) and each stage's;
    rewritten as each stage starts and ends, for ``parsl-run status`` (`workflows.runstate`)."""
    summary = {
        "site": ctx.site.name,
        "run_dir": str(paths.root),
        "state": state,
        "parsl_run_dir": os.path.relpath(parsl_run_dir, paths.root),  # the run dir may be moved or mounted
        "written": time.time(),
        "stages": {name: vars(record) for name, record in records.items()},
    }
    write_atomic(paths.summary, json.dumps(summary, indent=1))
