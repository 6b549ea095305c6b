"""Machine configurations: one module per site, each building a Parsl `Config` and its launch lines.

A site module ``site_configs/<name>.py`` (``-`` in the name becomes ``_``) defines:

- ``DEFAULTS``: `SiteConfig` fields, with ``name``; the module docstring cites the centre's guide;
- ``parsl_config(site, run_dir) -> parsl.Config`` with executors ``stages`` (data, export, evaluate) and
  ``train`` (the training bash app);
- ``train_command(site, nodes, ranks_per_node, config_file) -> str``: the training launch line;
- optionally ``check(site, run_config)`` (raises ValueError naming the field; run before anything starts),
  ``train_resources(site, launch) -> dict`` (the training app's ``parsl_resource_specification``) and
  ``describe_submission(site, run_config, paths) -> str`` (the batch scripts, for ``--dry-run``).

A batch site (``scheduler`` slurm or pbs) takes each of these it does not define from `site_configs.batch`,
the shared Slurm/PBS implementation, so most site modules are their ``DEFAULTS`` and a docstring.
`site_module` resolves them once into a `SiteFunctions`; the modules themselves are never modified.

Users override fields through the per-user file (`user_file`) and the run config's ``site.`` keys, never by
editing the package.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import ValidationError

from site_configs.schema import SiteConfig


class UnknownSite(ValueError):
    pass


def user_file() -> Path:
    """``$XDG_CONFIG_HOME/matris-janus/sites.yaml`` (``~/.config/...`` when unset): a mapping of site name
    to `SiteConfig` fields, e.g. ``frontier: {account: ABC123, worker_init: "module load rocm/6.4.1"}``."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "matris-janus" / "sites.yaml"


def available_sites() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "DEFAULTS"):
            names.append(module.DEFAULTS["name"])
    return sorted(names)


@dataclass(frozen=True)
class SiteFunctions:
    """What a site provides: its module's own functions, or `site_configs.batch`'s for a batch site;
    ``None`` where neither has one."""

    doc: str
    defaults: dict[str, Any]
    parsl_config: Callable[..., Any]
    train_command: Callable[..., str]
    check: Callable[..., None] | None
    train_resources: Callable[..., dict[str, Any]] | None
    describe_submission: Callable[..., str] | None


OPTIONAL = ("check", "train_resources", "describe_submission")


def site_module(name: str) -> SiteFunctions:
    """The functions of site ``name``, with `site_configs.batch`'s filling in for a batch site."""
    if name not in available_sites():
        raise UnknownSite(f"unknown site {name!r}; available sites: {', '.join(available_sites())}")
    module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    fallback: ModuleType | None = None
    if module.DEFAULTS["scheduler"] in ("slurm", "pbs"):
        from site_configs import batch

        fallback = batch

    def function(attribute: str) -> Callable[..., Any] | None:
        own = vars(module).get(attribute)
        return own if own is not None else vars(fallback).get(attribute) if fallback else None

    required = {attribute: function(attribute) for attribute in ("parsl_config", "train_command")}
    missing = [attribute for attribute, found in required.items() if found is None]
    if missing:
        raise UnknownSite(f"site module {module.__name__} defines no {', '.join(missing)}")
    return SiteFunctions(
        doc=(module.__doc__ or "").strip(),
        defaults=module.DEFAULTS,
        **required,
        **{attribute: function(attribute) for attribute in OPTIONAL},
    )


def user_overrides(name: str, path: Path) -> dict[str, Any]:
    """This site's section of the per-user file (empty when the file or the section is absent)."""
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get(name, {}), dict):
        raise ValueError(f"{path}: expected a mapping of site name to fields, e.g. '{name}: {{account: X}}'")
    return data.get(name) or {}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Later layers win field by field; ``environment`` merges variable by variable, so a user adds a
    variable without dropping the site's recommended ones."""
    merged = {**base, **update}
    if "environment" in base and "environment" in update:
        merged["environment"] = {**base["environment"], **update["environment"]}
    return merged


def resolve(name: str, overrides: dict[str, Any], path: Path | None = None) -> SiteConfig:
    """Site defaults, then the per-user file, then the run config's ``site.`` keys; validated as a whole.
    An error in a field whose value came from the per-user file names that file."""
    functions = site_module(name)
    path = (path or user_file()).expanduser()
    user = user_overrides(name, path)
    from_file = set(user) - set(overrides)
    try:
        return SiteConfig(**merge(merge(functions.defaults, user), overrides))
    except ValidationError as err:
        problems = []
        for error in err.errors():
            cause = error.get("ctx", {}).get("error")
            message = str(cause) if cause is not None else error["msg"]
            if not error["loc"]:
                problems.append(message)
                continue
            field = ".".join(str(part) for part in error["loc"])
            source = f"{path}: " if error["loc"][0] in from_file else ""
            problems.append(f"{source}site.{field}: {message}")
        raise ValueError("; ".join(problems)) from None


def monitoring_hub(site: SiteConfig) -> Any:
    """Parsl's `MonitoringHub` when ``site.monitoring`` is on (else None). Its database is Parsl's default,
    ``monitoring.db`` in the Config's ``run_dir`` (`workflows.rundir.RunPaths.monitoring_db`); the hub needs
    Parsl's ``monitoring`` extra (SQLAlchemy), which `require_monitoring` checks before anything starts."""
    if not site.monitoring:
        return None
    from parsl.monitoring import MonitoringHub

    return MonitoringHub(workflow_name="matris-janus", resource_monitoring_interval=10)


def require_monitoring(site: SiteConfig) -> None:
    """Raise ValueError naming the missing package when ``site.monitoring`` is on and cannot work here."""
    if not site.monitoring:
        return
    try:
        import parsl.monitoring.db_manager  # noqa: F401 (imports SQLAlchemy, as the hub does)
    except ImportError as error:
        raise ValueError(
            f"site.monitoring needs Parsl's monitoring extra ({error}); "
            "pip install 'matris-janus[monitoring]' or 'parsl[monitoring]'"
        ) from None
