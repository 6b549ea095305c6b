"""Machine configurations: one module per site, each building a Parsl `Config` and its launch lines.

A site module defines ``DEFAULTS`` (a dict of `SiteConfig` fields, with the centre's guide cited in its
docstring), ``parsl_config(site, run_dir)`` and ``train_command(site, launch, config_file)``. Users
override fields through the run config's ``site.`` keys or the per-user file, never by editing the package.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from site_configs.schema import SiteConfig

USER_FILE = Path("~/.config/matris-janus/sites.yaml")


class UnknownSite(ValueError):
    pass


def available_sites() -> list[str]:
    names = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "schema" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "DEFAULTS"):
            names.append(module.DEFAULTS["name"])
    return sorted(names)


def site_module(name: str) -> ModuleType:
    if name not in available_sites():
        raise UnknownSite(f"unknown site {name!r}; available sites: {', '.join(available_sites())}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def user_overrides(name: str, path: Path = USER_FILE) -> dict[str, Any]:
    """Per-user settings (account, environment set-up) from ``~/.config/matris-janus/sites.yaml``:
    a mapping of site name to `SiteConfig` fields."""
    path = path.expanduser()
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ValueError(f"{path}: the entry for site {name!r} must be a mapping of site fields")
    return section


def resolve(name: str, overrides: dict[str, Any], user_file: Path = USER_FILE) -> SiteConfig:
    """Site defaults, then the user's file, then the run config's ``site.`` keys; validated."""
    module = site_module(name)
    site = SiteConfig(**{**module.DEFAULTS, **user_overrides(name, user_file), **overrides})
    site.check()
    return site
