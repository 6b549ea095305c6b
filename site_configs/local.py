"""This machine (a laptop or a workstation): no scheduler.

Stage apps (data preparation, export, evaluation) run on a Parsl HighThroughputExecutor over a
LocalProvider; training runs as a bash app that starts its ranks on this machine with torchrun and the gloo
backend (CPU) or nccl when a GPU is present. Parsl's run information lives in ``RUN_DIR/runinfo``. Nothing is
retried: a failure here is visible at once, and rerunning the same command resumes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from parsl.config import Config
from parsl.dataflow.memoization import BasicMemoizer
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
from parsl.launchers import SingleNodeLauncher
from parsl.providers import LocalProvider

from site_configs import monitoring_hub
from site_configs.schema import SiteConfig

DEFAULTS = {
    "name": "local",
    "scheduler": "local",
    "backend": "gloo",
    "stage_workers": 2,
    "walltime": "24:00:00",
}


def python_path_init() -> str:
    """Put this interpreter's bin directory first, so workers find the same environment."""
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"


def environment_exports(site: SiteConfig) -> list[str]:
    """``export NAME=value`` for the site's ``environment``, values quoted so they are never executed."""
    return [f"export {name}={shlex.quote(value)}" for name, value in site.environment.items()]


def parsl_config(site: SiteConfig, run_dir: Path) -> Config:
    parts = (python_path_init(), site.worker_init, *environment_exports(site))
    worker_init = "; ".join(part for part in parts if part)
    stages = HighThroughputExecutor(
        label="stages",
        address="127.0.0.1",
        max_workers_per_node=site.stage_workers,
        cores_per_worker=1,
        provider=LocalProvider(
            init_blocks=1, min_blocks=0, max_blocks=1, worker_init=worker_init, launcher=SingleNodeLauncher()
        ),
    )
    train = ThreadPoolExecutor(label="train", max_threads=1)
    return Config(
        executors=[stages, train],
        run_dir=str(run_dir / "runinfo"),
        memoizer=BasicMemoizer(checkpoint_mode="task_exit"),
        retries=site.retries,
        monitoring=monitoring_hub(site),
        strategy="simple",
        max_idletime=30.0,
    )


def check(site: SiteConfig, run: Any) -> None:
    if run.launch.nodes != 1:
        raise ValueError(f"the local site has one node; launch.nodes is {run.launch.nodes}")


def train_command(site: SiteConfig, nodes: int, ranks_per_node: int, config_file: Path) -> str:
    """torchrun on this machine, after the site's ``environment`` (e.g. ``LD_PRELOAD`` of tcmalloc)."""
    torchrun = (
        f"{shlex.quote(sys.executable)} -m torch.distributed.run --standalone --nnodes 1 "
        f"--nproc-per-node {ranks_per_node} -m janus.train --config {shlex.quote(str(config_file))}"
    )
    return "; ".join([*environment_exports(site), torchrun])
