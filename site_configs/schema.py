"""The site schema: what a machine needs to know to run our stages and launch training.

Each site module (`site_configs/<name>.py`) supplies its defaults; the per-user file and the run config's
``site.`` keys override them. Every value that reaches a batch script or a shell command is validated here
against a strict character set (names, options) or quoted where it is written (environment values),
so a configuration value cannot inject a command. The one exception is ``worker_init``: it is shell code by
design (module loads, environment activation), exactly like Parsl's own ``worker_init``.

Cross-field rules (missing account, walltime over the queue's limit for the block's size, a block larger
than its queue allows) run as a model validator, so no `SiteConfig` exists that would be refused at
submission.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
# A token that means the same to bash quoted or not, and survives word splitting unchanged (no spaces,
# quotes, globs, $, `, ;, &, |, <, >, newlines): launcher options reach the shell through the unquoted
# $PARSL_MPI_PREFIX, scheduler options #SBATCH/#PBS lines.
TOKEN = r"[A-Za-z0-9_.,:@%+=/-]+"
SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%=,:-]+$")


def walltime_seconds(text: str) -> int:
    match = WALLTIME.match(text)
    if not match:
        raise ValueError(f"walltime {text!r} must be HH:MM:SS")
    hours, minutes, seconds = (int(g) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _matching(pattern: str, what: str):
    compiled = re.compile(rf"^(?:{pattern})$")

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not a valid {what}")
        return value

    return AfterValidator(check)


def _walltime(value: str) -> str:
    walltime_seconds(value)
    return value


def _yaml_sexagesimal(value: object) -> object:
    """YAML 1.1 (PyYAML, which reads run configs, ``--set`` values and the per-user file) reads an unquoted
    ``12:00:00`` as the base-60 integer 43200; a number is therefore taken as seconds (PBS's reading of a
    bare number too) and turned back into HH:MM:SS."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return f"{value // 3600:02d}:{value // 60 % 60:02d}:{value % 60:02d}"
    return value


Walltime = Annotated[str, BeforeValidator(_yaml_sexagesimal), AfterValidator(_walltime)]
Name = Annotated[
    str, _matching(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", "name (may only hold letters, digits and _.-)")
]
Token = Annotated[str, _matching(TOKEN, "option (may only hold letters, digits and _.,:@%+=/-)")]
Directive = Annotated[
    str, _matching(rf"{TOKEN}( {TOKEN})*", "scheduler option (words of letters, digits and _.,:@%+=/-)")
]
# Slurm feature expressions use & and | (gpu&hbm80g); a constraint is only ever written to an #SBATCH line.
Constraint = Annotated[str, _matching(r"[A-Za-z0-9_.,&|-]+", "Slurm constraint (letters, digits, _.,&|-)")]
Filesystems = Annotated[str, _matching(r"[a-z0-9_]+(:[a-z0-9_]+)*", "PBS filesystems list (e.g. home:flare)")]
Select = Annotated[
    str, _matching(r"[a-z_]+=[A-Za-z0-9_.-]+(:[a-z_]+=[A-Za-z0-9_.-]+)*", "PBS select resources (a=b:c=d)")
]
Address = Annotated[str, _matching(r"[A-Za-z0-9.:-]+", "host address")]
EnvName = Annotated[str, _matching(r"[A-Za-z_][A-Za-z0-9_]*", "environment variable name")]


class Queue(BaseModel):
    """One partition's (or QOS's, or PBS queue's) policy, as the centre's guide tabulates it."""

    model_config = ConfigDict(extra="forbid")

    max_walltime: Walltime
    max_nodes: int | None = Field(None, ge=1)
    min_nodes: int = Field(1, ge=1)
    walltime_by_nodes: dict[int, Walltime] = Field(
        default_factory=dict, description="size bins: a job of up to N nodes may run at most this long"
    )

    def walltime_limit(self, nodes: int) -> str:
        fitting = [size for size in self.walltime_by_nodes if size >= nodes]
        return self.walltime_by_nodes[min(fitting)] if fitting else self.max_walltime


class SiteConfig(BaseModel):
    """A machine, as the workflow sees it. Site modules give defaults; users override fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Name = "local"
    scheduler: Literal["local", "slurm", "pbs"] = "local"
    account: Name | None = Field(None, description="project/allocation charged (sbatch -A, qsub -A)")
    requires_account: bool = False
    partition: Name | None = Field(None, description="Slurm partition or PBS queue")
    qos: Name | None = None
    constraint: Constraint | None = Field(None, description="Slurm --constraint (node features)")
    queues: dict[str, Queue] = Field(default_factory=dict, description="limits by partition (or QOS)")
    limits_by: Literal["partition", "qos"] = Field("partition", description="which field names the queue")
    walltime: Walltime = "01:00:00"
    nodes_per_block: int = Field(1, ge=1, description="nodes in the training job (the MPIExecutor's block)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs (GCDs, tiles) per node: the most ranks per node")
    cores_per_node: int | None = Field(None, ge=1, description="the most ranks per node on a CPU-only site")
    device_memory_gib: float | None = Field(
        None, gt=0, description="memory of one GPU (GCD, tile) in GiB; a CPU site's ranks share the node's "
        "memory (None: this machine's); the layout planner fits each rank in it"
    )
    request_gpus: bool = Field(False, description="ask the scheduler for the GPUs (--gpus-per-node, ngpus=)")
    exclusive: bool = Field(True, description="Slurm blocks take whole nodes (#SBATCH --exclusive)")
    select: Select | None = Field(None, description="extra PBS chunk resources, e.g. system=polaris")
    cpus_per_node: int = Field(1, ge=1, description="PBS ncpus per chunk")
    cpu_bind: Token | None = Field(None, description="the launcher's --cpu-bind value")
    launcher_options: list[Token] = Field(default_factory=list, description="extra srun/mpiexec flags")
    scheduler_options: list[Directive] = Field(default_factory=list, description="extra #SBATCH/#PBS lines")
    filesystems: Filesystems | None = Field(None, description="PBS -l filesystems=")
    worker_init: str = Field("", description="shell code run before the workers start (module load ...)")
    environment: dict[EnvName, str] = Field(default_factory=dict, description="exported, quoted, on nodes")
    backend: Literal["gloo", "nccl", "xccl"] = "gloo"
    address: Address | None = Field(None, description="this host, as compute nodes reach it; None: probe")
    stage_partition: Name | None = Field(None, description="queue of the data/export/evaluate blocks")
    stage_walltime: Walltime | None = None
    stage_workers: int = Field(2, ge=1, description="concurrent data/eval/export tasks per node")
    stage_blocks: int = Field(1, ge=1, description="most one-node blocks running stage tasks at once")
    retries: int = Field(0, ge=0, description="retry budget of a task lost to a node, block or walltime")
    monitoring: bool = Field(False, description="Parsl's MonitoringHub: a task database for parsl-visualize")

    @model_validator(mode="after")
    def _consistent(self) -> SiteConfig:
        if self.requires_account and not self.account:
            raise ValueError(
                f"site.account is required on {self.name} (your project/allocation, e.g. "
                "--set site.account=ABC123 or 'account:' in your sites.yaml)"
            )
        if self.gpus_per_node and self.backend == "gloo":
            raise ValueError(f"site.backend gloo on {self.name}, which has {self.gpus_per_node} GPUs a node")
        if not self.gpus_per_node and self.backend != "gloo":
            raise ValueError(f"site.backend {self.backend} needs GPUs; site.gpus_per_node is 0")
        foreign = {"slurm": ("select", "filesystems"), "pbs": ("constraint", "qos")}.get(self.scheduler, ())
        for field in foreign:
            if getattr(self, field) is not None:
                raise ValueError(f"site.{field} means nothing to {self.scheduler} on {self.name}")
        self._within_queue(
            self.limits_by,
            self.queue,
            "site.walltime",
            self.walltime,
            "site.nodes_per_block",
            self.nodes_per_block,
        )
        by_stage_partition = self.stage_partition and self.limits_by == "partition"
        self._within_queue(
            "stage_partition" if by_stage_partition else self.limits_by,
            self.stage_queue,
            "site.stage_walltime",
            self.stage_block_walltime,
            "a stage block",
            1,
        )
        return self

    @property
    def queue(self) -> str | None:
        """The name the queue limits are keyed by: the partition, or the QOS where a centre limits by QOS."""
        return self.qos if self.limits_by == "qos" else self.partition

    @property
    def stage_queue(self) -> str | None:
        """The queue the stage blocks' limits come from (a QOS-limited site keeps its QOS)."""
        return self.queue if self.limits_by == "qos" else self.stage_partition or self.partition

    @property
    def stage_block_walltime(self) -> str:
        """``stage_walltime``, else ``walltime`` cut to what the stage queue allows a one-node job (Frontier
        gives 1 to 91 nodes 2 h, bigger jobs 12 h: a 12 h training must not ask 12 h for its data block)."""
        if self.stage_walltime or self.stage_queue not in self.queues:
            return self.stage_walltime or self.walltime
        limit = self.queues[self.stage_queue].walltime_limit(1)
        return min(self.walltime, limit, key=walltime_seconds)

    def _within_queue(
        self, field: str, queue: str | None, walltime_field: str, walltime: str, nodes_field: str, nodes: int
    ) -> None:
        if not self.queues:
            return
        field = f"site.{field}"
        if queue not in self.queues:
            raise ValueError(f"{field} {queue!r} is not one of {self.name}'s: {', '.join(self.queues)}")
        limits = self.queues[queue]
        if limits.max_nodes is not None and nodes > limits.max_nodes:
            raise ValueError(
                f"{nodes_field}={nodes} exceeds the {limits.max_nodes}-node limit of {field} {queue!r} "
                f"on {self.name}"
            )
        if nodes < limits.min_nodes:
            raise ValueError(
                f"{field} {queue!r} takes jobs of at least {limits.min_nodes} nodes on {self.name}; "
                f"{nodes_field} is {nodes}"
            )
        limit = limits.walltime_limit(nodes)
        if walltime_seconds(walltime) > walltime_seconds(limit):
            raise ValueError(
                f"{walltime_field} {walltime} exceeds the {limit} limit of {field} {queue!r} "
                f"for a {nodes}-node job on {self.name}"
            )


def require_safe_path(path: Path, field: str = "--run-dir") -> None:
    """Run paths end up in #SBATCH/#PBS lines, in Parsl's ``qsub`` command line and, unquoted, in the
    ``bash -c`` line of Parsl's LocalProvider: refuse what a shell or a batch script would split or run."""
    if not SAFE_PATH.match(str(path)):
        raise ValueError(
            f"{field} {str(path)!r} holds characters a shell or batch script cannot carry safely "
            "(spaces, quotes, $, ;, `, newlines, non-ASCII, ...); use letters, digits and _./+@%=,:-"
        )
