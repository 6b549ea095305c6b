"""`parsl-run WORKFLOW.py --site NAME [--config RUN.yaml] [--run-dir DIR] [--set key.path=value ...]`.

Parsl has no such command upstream; this one loads a workflow file, resolves and validates the run config
and the site before anything starts, then loads the site's Parsl `Config` and runs the workflow's DAG.
A workflow file defines ``CONFIG`` (its run-config class), ``describe(ctx) -> str`` (the DAG, for
``--dry-run``) and ``run(ctx) -> int`` (exit status), and optionally ``check(ctx)`` (raises `ConfigError`;
runs before anything starts, dry runs included).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import site_configs
from janus.overrides import ConfigError
from site_configs.schema import SiteConfig, require_safe_path
from workflows import plan

EPILOG = """examples:
  parsl-run workflows/pretrain.py --site local
  parsl-run workflows/pretrain.py --site local --set train.steps=50 --set model.preset=tiny
  parsl-run workflows/pretrain.py --site local --run-dir runs/exp1      # rerun the same line to resume
  parsl-run workflows/pretrain.py --site local --dry-run
  parsl-run workflows/scaling.py --site frontier --set scaling.nodes=[1,2,4,8] --schedule nightly
  parsl-run --list-sites
  parsl-run status runs/pretrain-local [--plot]   # how a running or finished run is doing
"""


@dataclass
class WorkflowContext:
    """Everything a workflow needs: the validated run config, the site, and where to write."""

    run: Any
    site: SiteConfig
    site_module: site_configs.SiteFunctions
    run_dir: Path
    workflow_file: Path
    config_file: Path | None = None
    assignments: list[str] = field(default_factory=list)
    dry_run: bool = False
    extend: bool = False
    request: plan.Request | None = None  # how the layout and batch budget were completed


def load_workflow(path: Path) -> ModuleType:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"workflow file {path} does not exist")
    name = f"parsl_run_workflow_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    for name in ("CONFIG", "describe", "run"):
        if not hasattr(module, name):
            raise ConfigError(f"workflow file {path} does not define {name!r}")
    return module


def make_context(args: argparse.Namespace) -> tuple[ModuleType, WorkflowContext]:
    """Everything that can fail on user input fails here, before Parsl starts."""
    workflow = load_workflow(args.workflow)
    try:
        module = site_configs.site_module(args.site)
    except site_configs.UnknownSite as err:
        raise ConfigError(str(err)) from err
    run_dir = (args.run_dir or Path("runs") / f"{Path(args.workflow).stem}-{args.site}").resolve()
    try:
        require_safe_path(run_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    request = plan.resolve_request(
        workflow.CONFIG, args.config, args.set, args.site, args.sites_file, run_dir
    )
    run, site = request.run, request.site
    ctx = WorkflowContext(
        run=run, site=site, site_module=module, run_dir=run_dir, workflow_file=args.workflow,
        config_file=args.config, assignments=list(args.set), dry_run=args.dry_run, extend=args.extend,
        request=request,
    )  # fmt: skip
    if (args.schedule or args.unschedule) and not hasattr(workflow, "schedule"):
        raise ConfigError(f"workflow {args.workflow} cannot be scheduled (no schedule function)")
    if module.check is not None:
        try:
            module.check(site, run)
        except ValueError as err:
            raise ConfigError(f"site {args.site!r}: {err}") from err
    if hasattr(workflow, "check"):
        workflow.check(ctx)
    return workflow, ctx


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parsl-run",
        description="Run a MatRIS/Janus Parsl workflow (pretrain, scaling) on a named site.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("workflow", type=Path, nargs="?", help="workflow file, e.g. workflows/pretrain.py")
    p.add_argument("--site", help="machine to run on (see --list-sites)")
    p.add_argument("--config", type=Path, help="run config YAML; --set values override it")
    p.add_argument(
        "--run-dir", type=Path, help="run directory (default runs/WORKFLOW-SITE); reuse it to resume"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a run-config key, e.g. train.steps=100, model.preset=moe-s, site.account=abc123",
    )  # fmt: skip
    p.add_argument(
        "--sites-file", type=Path, metavar="YAML",
        help="per-user site settings (account, worker_init, ...); "
        "default $XDG_CONFIG_HOME/matris-janus/sites.yaml",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the DAG and launch scripts; submit nothing")
    p.add_argument(
        "--extend", action="store_true",
        help="resume a run dir with a larger train.steps (or train.time_budget_s) than it was made with",
    )  # fmt: skip
    p.add_argument("--list-sites", action="store_true", help="list the available sites and exit")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--schedule", choices=["nightly"], help="install the run as a nightly job (scaling)")
    when.add_argument("--unschedule", action="store_true", help="remove the nightly job of this run dir")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        from workflows.status import main as status

        return status(argv[1:])
    args = parser().parse_args(argv)
    if args.list_sites:
        for name in site_configs.available_sites():
            doc = site_configs.site_module(name).doc.splitlines()[0]
            print(f"{name:14s} {doc}")
        return 0
    if args.workflow is None or args.site is None:
        parser().print_usage(sys.stderr)
        print("parsl-run: a workflow file and --site are required (or --list-sites)", file=sys.stderr)
        return 2
    try:
        workflow, ctx = make_context(args)
    except ConfigError as err:
        print(f"parsl-run: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(plan.report(ctx.request))
        print(workflow.describe(ctx))
        return 0
    if args.schedule or args.unschedule:
        try:
            return int(workflow.schedule(ctx, args.schedule or "off"))
        except RuntimeError as err:
            print(f"parsl-run: {err}", file=sys.stderr)
            return 1
    interpreter_bin_on_path()
    try:
        return int(workflow.run(ctx))
    except ConfigError as err:
        print(f"parsl-run: {err}", file=sys.stderr)
        return 2


def interpreter_bin_on_path() -> None:
    """Put this interpreter's ``bin`` first on ``PATH``: Parsl starts ``interchange.py`` and
    ``process_worker_pool.py`` by name, and they are installed there, so ``.venv/bin/parsl-run`` from an
    unactivated venv (or cron) would otherwise fail with ``No such file or directory: 'interchange.py'``."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


if __name__ == "__main__":
    sys.exit(main())
