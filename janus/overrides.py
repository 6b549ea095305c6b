"""`--set key.path=value` overrides on pydantic configs, checked against the schema before anything runs.

Values are parsed as YAML (`3`, `1e-3`, `[1,2,4]`, `true`, `moe-s`), so the command line speaks the same
language as the config files. A wrong path fails naming the segment and the keys allowed there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one clear message (never retried)."""


def parse_assignment(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty segment in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return path, value


def check_path(schema: type[BaseModel], path: list[str]) -> None:
    """Raise unless ``path`` names a field of ``schema`` (free-form dict fields accept any sub-key)."""
    current: Any = schema
    for depth, segment in enumerate(path):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            if get_origin(current) is dict or current is dict:
                return
            done = ".".join(path[:depth])
            raise ConfigError(f"--set {'.'.join(path)}: {done!r} is a value, it has no field {segment!r}")
        fields = current.model_fields
        if segment not in fields:
            where = ".".join(path[:depth]) or "the run config"
            raise ConfigError(
                f"--set {'.'.join(path)}: unknown key {segment!r} in {where}; allowed: {', '.join(fields)}"
            )
        current = _unwrap_optional(fields[segment].annotation)


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not None and len(args) == 1 and get_origin(annotation) is not dict:
        return args[0]
    return annotation


def set_in(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for segment in path[:-1]:
        child = node.get(segment)
        if not isinstance(child, dict):
            child = {}
            node[segment] = child
        node = child
    node[path[-1]] = value


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def build(schema: type[T], data: dict[str, Any], assignments: list[str]) -> T:
    """Apply ``assignments`` to ``data`` and validate; every problem is a `ConfigError` naming the field."""
    for text in assignments:
        path, value = parse_assignment(text)
        check_path(schema, path)
        set_in(data, path, value)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from err


def format_validation_error(err: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        got = problem.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {problem['msg']}{shown}")
    return "\n".join(lines)
