"""The site schema: what a machine needs to know to run our stages and launch training.

Each site module (`site_configs/<name>.py`) supplies its defaults; the run config's `site.` keys and the
per-user file override them. Everything that reaches a shell command or batch script is validated here,
so a configuration value cannot inject a command.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.,:@%+=/\-]*$")
WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")


def walltime_seconds(text: str) -> int:
    match = WALLTIME.match(text)
    if not match:
        raise ValueError(f"walltime {text!r} must be HH:MM:SS")
    hours, minutes, seconds = (int(g) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class SiteConfig(BaseModel):
    """A machine, as the workflow sees it. Site modules give defaults; users override fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = "local"
    scheduler: Literal["local", "slurm", "pbs", "flux"] = "local"
    account: str | None = None
    partition: str | None = Field(None, description="Slurm partition or PBS queue")
    qos: str | None = None
    walltime: str = "01:00:00"
    max_walltime: str | None = Field(None, description="longest walltime the queue accepts")
    nodes_per_block: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cores_per_node: int | None = Field(None, ge=1)
    stage_workers: int = Field(2, ge=1, description="concurrent data/eval/export tasks per node")
    backend: Literal["gloo", "nccl", "xccl"] = "gloo"
    launcher: Literal["torchrun", "srun", "mpiexec"] = "torchrun"
    launcher_options: list[str] = Field(default_factory=list)
    scheduler_options: list[str] = Field(default_factory=list, description="extra #SBATCH / #PBS lines")
    filesystems: str | None = None
    worker_init: str = ""
    environment: dict[str, str] = Field(default_factory=dict)
    requires_account: bool = False

    @field_validator("walltime", "max_walltime")
    @classmethod
    def _walltime(cls, value: str | None) -> str | None:
        if value is not None:
            walltime_seconds(value)
        return value

    @field_validator("account", "partition", "qos", "filesystems")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not SAFE_TOKEN.match(value):
            raise ValueError(f"{value!r} may only hold letters, digits and _.,:@%+=/-")
        return value

    @field_validator("launcher_options", "scheduler_options")
    @classmethod
    def _options(cls, values: list[str]) -> list[str]:
        for value in values:
            if not SAFE_TOKEN.match(value.replace(" ", "")) or any(c in value for c in "\n;&|`$<>"):
                raise ValueError(f"option {value!r} holds characters that a shell would interpret")
        return values

    @field_validator("environment")
    @classmethod
    def _environment(cls, values: dict[str, str]) -> dict[str, str]:
        for key in values:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"environment variable name {key!r} is not valid")
        return values

    def check(self) -> None:
        """Cross-field rules that hold for every site."""
        if self.requires_account and not self.account:
            raise ValueError(f"site {self.name!r} needs site.account (your allocation/project name)")
        if self.max_walltime and walltime_seconds(self.walltime) > walltime_seconds(self.max_walltime):
            raise ValueError(
                f"site.walltime {self.walltime} exceeds the queue's limit {self.max_walltime} on {self.name}"
            )
