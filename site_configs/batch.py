"""What every batch site shares (Slurm or PBS Pro): the Parsl configuration, the training launch line, the
checks that must pass before anything is submitted, the retry policy, and the dry-run rendering.

Executors:

- ``stages`` (data preparation, export, evaluation): a HighThroughputExecutor whose blocks are one-node batch
  jobs in ``site.stage_partition`` (else the training partition), up to ``site.stage_blocks`` at once.
- ``train``: an MPIExecutor whose block is one ``site.nodes_per_block``-node job. Its provider uses the
  SimpleLauncher (one worker pool on the job's first node); the training task asks for its nodes and ranks
  in ``parsl_resource_specification`` (`train_resources`) and runs ``$PARSL_MPI_PREFIX python -m
  janus.train``, which Parsl expands to ``srun ...`` or ``mpiexec ...`` over the task's own nodes.
  ``cores_per_node`` is never set on it: MPIExecutor's provider must not carry one (Parsl 2026 releases).

The dry run (`describe_submission`) renders the scripts with Parsl's own code: it builds the same `Config`,
then calls each executor's ``_launch_block`` (the call Parsl's scaling strategy makes), with the providers'
``execute_wait`` and ``_write_submit_script`` swapped for recorders, so the script text (the provider's
template filled with the same ``string.Template`` substitution) and the ``sbatch``/``qsub`` line are what a
real run would write and run, and nothing is run or written. Only the worker port (chosen when the
interchange starts) and the job names' timestamps differ from a real run.
"""

from __future__ import annotations

import math
import shlex
from functools import partial
from pathlib import Path
from string import Template
from typing import Any

from parsl.app.errors import BashExitFailure
from parsl.config import Config
from parsl.dataflow.memoization import BasicMemoizer
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.executors.errors import ExecutorError
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.executors.high_throughput.mpi_prefix_composer import compose_all, validate_resource_spec
from parsl.jobs.error_handlers import windowed_error_handler
from parsl.jobs.errors import TooManyJobFailuresError
from parsl.launchers import SimpleLauncher, SingleNodeLauncher
from parsl.launchers.base import Launcher
from parsl.providers import PBSProProvider, SlurmProvider
from parsl.providers.cluster_provider import ClusterProvider
from parsl.providers.errors import ExecutionProviderException

from site_configs import monitoring_hub
from site_configs.local import environment_exports, python_path_init
from site_configs.schema import SiteConfig, require_safe_path

MPI_LAUNCHER = {"slurm": "srun", "pbs": "mpiexec"}
DIRECTIVE = {"slurm": "#SBATCH", "pbs": "#PBS"}
# The rendezvous address is the first node of the task's own node list (not of the block: a block may run
# several tasks). Slurm node names need not resolve (the loopback cluster's n1..n4 do not), so Slurm's
# NodeAddr is asked once here rather than by every rank; PBS node files hold resolvable host names.
MASTER_ADDR = {
    "slurm": 'MASTER_ADDR=$(scontrol show node "${PARSL_MPI_NODELIST%%,*}" | grep -o "NodeAddr=[^ ]*" '
    "| cut -d= -f2)",
    "pbs": "MASTER_ADDR=${PARSL_MPI_NODELIST%%,*}",
}
# A port from the job id: two trainings that share a node (different runs, or every node of the loopback
# cluster) do not collide, and a retry in a new block gets a fresh port.
JOB_NUMBER = {"slurm": "$SLURM_JOB_ID", "pbs": "${PBS_JOBID%%.*}"}
CONFIG_ERROR_EXIT = 2  # janus.train's exit status for a configuration or parallel-layout error


def parsl_config(site: SiteConfig, run_dir: Path, strategy_period: float = 5.0) -> Config:
    require_safe_path(run_dir)
    return Config(
        executors=[stage_executor(site), train_executor(site)],
        run_dir=str(run_dir / "runinfo"),
        memoizer=BasicMemoizer(checkpoint_mode="task_exit"),
        retries=site.retries,
        monitoring=monitoring_hub(site),
        retry_handler=retry_handler,
        # Not "htex_auto_scale": in Parsl 2026.10.26 its scale-in asks HTEX to cancel 0 blocks, and
        # HighThroughputExecutor.scale_in(0, max_idletime) then cancels every block whose workers have not
        # connected yet (idle time infinite), so a multi-node block is cancelled as soon as it is queued.
        strategy="simple",
        strategy_period=strategy_period,
    )


def stage_executor(site: SiteConfig) -> HighThroughputExecutor:
    return HighThroughputExecutor(
        label="stages",
        address=site.address,
        max_workers_per_node=site.stage_workers,
        cores_per_worker=1,
        provider=provider(
            site,
            site.stage_partition or site.partition,
            1,
            site.stage_block_walltime,
            SingleNodeLauncher(),
            site.stage_blocks,
        ),
        block_error_handler=block_error_handler(site),
    )


def train_executor(site: SiteConfig) -> MPIExecutor:
    return MPIExecutor(
        label="train",
        mpi_launcher=MPI_LAUNCHER[site.scheduler],
        max_workers_per_block=1,
        address=site.address,
        provider=provider(site, site.partition, site.nodes_per_block, site.walltime, SimpleLauncher(), 1),
        block_error_handler=block_error_handler(site),
    )


def provider(
    site: SiteConfig, partition: str | None, nodes: int, walltime: str, launcher: Launcher, max_blocks: int
) -> SlurmProvider | PBSProProvider:
    """A provider whose blocks start only when tasks wait for them (``init_blocks=0``) and end when idle."""
    lines = [f"{DIRECTIVE[site.scheduler]} {option}" for option in site.scheduler_options]
    common = dict(
        nodes_per_block=nodes,
        init_blocks=0,
        min_blocks=0,
        max_blocks=max_blocks,
        walltime=walltime,
        worker_init=worker_init(site),
        launcher=launcher,
    )
    if site.scheduler == "slurm":
        return SlurmProvider(
            partition=partition,
            account=site.account,
            qos=site.qos,
            constraint=site.constraint,
            gpus_per_node=site.gpus_per_node if site.request_gpus else None,
            scheduler_options="\n".join(lines),
            exclusive=site.exclusive,
            **common,
        )
    if site.filesystems:
        lines.insert(0, f"#PBS -l filesystems={site.filesystems}")
    select = [f"ngpus={site.gpus_per_node}"] if site.request_gpus else []
    select += [site.select] if site.select else []
    return PBSProProvider(
        account=site.account,
        queue=partition,
        scheduler_options="\n".join(lines),
        select_options=":".join(select),
        cpus_per_node=site.cpus_per_node,
        **common,
    )


def worker_init(site: SiteConfig) -> str:
    """The site's set-up (module loads), then this interpreter's bin directory first on PATH (so a venv made
    on top of the centre's framework module wins over the module's own Python), then the variables."""
    parts = (site.worker_init, python_path_init(), *environment_exports(site))
    return "\n".join(part for part in parts if part)


def block_error_handler(site: SiteConfig):
    """Mark the executor failed only after ``retries + 1`` blocks in a row failed (Parsl's default gives up
    after the first failed block when ``init_blocks`` is 0, so a single lost node would end the run)."""
    return partial(windowed_error_handler, threshold=site.retries + 1)


def train_command(site: SiteConfig, nodes: int, ranks_per_node: int, config_file: Path) -> str:
    """The training task's command line; Parsl sets ``$PARSL_MPI_PREFIX`` from `train_resources`."""
    port = f"MASTER_PORT=$((20000 + {JOB_NUMBER[site.scheduler]} % 20000))"
    return (
        f"export {MASTER_ADDR[site.scheduler]} {port}; "
        f"$PARSL_MPI_PREFIX python -m janus.train --config {shlex.quote(str(config_file))}"
    )


def train_resources(site: SiteConfig, launch: Any) -> dict[str, Any]:
    """The MPIExecutor resource specification of the training task. ``launcher_options`` reaches the shell
    through word splitting of ``$PARSL_MPI_PREFIX``, where quotes mean nothing: the schema admits only
    tokens without spaces, quotes, globs or shell operators."""
    options = ([f"--cpu-bind={site.cpu_bind}"] if site.cpu_bind else []) + site.launcher_options
    return {
        "num_nodes": launch.nodes,
        "ranks_per_node": launch.ranks_per_node,
        "launcher_options": " ".join(options),
    }


def check(site: SiteConfig, run: Any) -> None:
    """Rules between the run and the site, checked before anything is submitted. The node count is the
    largest any training task of the run asks for: ``launch.nodes``, or the top rung of a scaling ladder."""
    launch = run.launch
    field, nodes = "launch.nodes", launch.nodes
    ladder = getattr(run, "scaling", None)
    if ladder is not None and max(ladder.nodes) > nodes:
        field, nodes = "scaling.nodes", max(ladder.nodes)
    if nodes > site.nodes_per_block:
        raise ValueError(
            f"{field} asks for {nodes} nodes, more than site.nodes_per_block={site.nodes_per_block}: Parsl "
            f"would wait forever for nodes the block does not have; set site.nodes_per_block={nodes}"
        )
    if site.gpus_per_node and launch.ranks_per_node > site.gpus_per_node:
        raise ValueError(
            f"launch.ranks_per_node={launch.ranks_per_node} is more than "
            f"site.gpus_per_node={site.gpus_per_node} on {site.name} (one rank per GPU)"
        )
    if not site.gpus_per_node and site.cores_per_node and launch.ranks_per_node > site.cores_per_node:
        raise ValueError(
            f"launch.ranks_per_node={launch.ranks_per_node} is more than "
            f"site.cores_per_node={site.cores_per_node} on {site.name}"
        )


def retry_handler(exception: BaseException, task_record: Any) -> float:
    """The cost of a failed try against ``Config.retries``: 1 for what a rerun can fix, more than any
    budget for what it cannot.

    Retried: a block lost to a node failure or its walltime (the worker pool vanishes: ManagerLost,
    WorkerLost), an executor or provider failure, and a training launch that exited non-zero for any
    reason but a configuration error (a rank killed with its node, srun/mpiexec losing a node); the rerun
    of ``janus.train`` resumes from its newest checkpoint. Not retried: janus.train's exit status 2 (a
    configuration or layout error fails the same way every time), and exceptions raised by the stage apps'
    own code, which are deterministic.
    """
    if isinstance(exception, BashExitFailure):
        return math.inf if exception.exitcode == CONFIG_ERROR_EXIT else 1
    lost = (ManagerLost, WorkerLost, ExecutorError, ExecutionProviderException, TooManyJobFailuresError)
    return 1 if isinstance(exception, lost) else math.inf


def describe_submission(site: SiteConfig, run: Any, paths: Any) -> str:
    """The exact batch scripts and commands a run would submit, and the training task's launch line."""
    runinfo = next_rundir(paths.root / "runinfo")
    config = parsl_config(site, paths.root)
    submitted = record_submissions([executor.provider for executor in config.executors])
    for executor in config.executors:  # what DataFlowKernel and executor.start() set, then scale-out
        executor.run_dir = str(runinfo)
        executor.provider.script_dir = str(runinfo / "submit_scripts")
        executor.worker_port = "<port chosen when the run starts>"
        executor.logconf_path = None
        executor.initialize_scaling()
        executor._launch_block("0")
    spec = train_resources(site, run.launch)
    validate_resource_spec(spec)
    nodes = [f"<node{i + 1}>" for i in range(run.launch.nodes)]
    prefix = compose_all(MPI_LAUNCHER[site.scheduler], spec, nodes)["PARSL_MPI_PREFIX"]
    lines = [f"batch submission on {site.name} ({site.scheduler}); --dry-run submits nothing"]
    for executor, (command, script_path, script) in zip(config.executors, submitted, strict=True):
        role = "data, export, evaluate" if executor.label == "stages" else "training"
        lines += [
            "",
            f"# block of executor {executor.label!r} ({role}): {executor.provider.nodes_per_block} node(s), "
            f"up to {executor.provider.max_blocks} at once, started when its tasks are ready",
            f"$ {command}",
            f"# {script_path}:",
            script.rstrip(),
        ]
    lines += [
        "",
        f"# training task on the 'train' block: parsl_resource_specification={spec}",
        f"# Parsl sets PARSL_MPI_PREFIX={prefix}",
        f"# retries: {site.retries} (lost node or block, non-zero exit except {CONFIG_ERROR_EXIT}: "
        "configuration error); a retried training resumes from its newest checkpoint",
    ]
    return "\n".join(lines)


def next_rundir(runinfo: Path) -> Path:
    """The numbered directory Parsl's ``make_rundir`` will create next (read-only here)."""
    numbers = [int(p.name) for p in runinfo.glob("[0-9]*[0-9]")] if runinfo.is_dir() else []
    return runinfo / f"{max(numbers) + 1 if numbers else 0:03d}"


def record_submissions(providers: list[ClusterProvider]) -> list[tuple[str, str, str]]:
    """These provider instances run no scheduler command and write no file: each submission is recorded
    as (submit command, script path, script text) and answered with a fake job id."""
    submitted: list[tuple[str, str, str]] = []
    scripts: dict[str, str] = {}

    def write(template: str, script_filename: str, job_name: str, configs: dict) -> None:
        scripts[script_filename] = Template(template).substitute(jobname=job_name, **configs)

    def execute(cmd: str, timeout: int | None = None) -> tuple[int, str, str]:
        script = next((path for path in scripts if cmd.endswith(path)), None)
        if script is None:  # a status probe such as SlurmProvider's ``sacct -X``
            return 0, "", ""
        submitted.append((cmd, script, scripts.pop(script)))
        return 0, "Submitted batch job 0\n" if cmd.startswith("sbatch") else "0.dry-run\n", ""

    for provider in providers:
        provider._write_submit_script = write
        provider.execute_wait = execute
    return submitted
