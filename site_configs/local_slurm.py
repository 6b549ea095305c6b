"""The loopback Slurm cluster of the tests (four nodes n1..n4 of 2 CPUs on this machine; tests/slurm/).

It follows the same batch path as the production Slurm sites (Frontier, Perlmutter, LUMI): Parsl submits
its blocks with ``sbatch`` to partition ``batch``, training is one MPIExecutor task launched with ``srun``
over the task's nodes, with gloo on CPUs. Guide: ``tests/slurm/README.md`` (Slurm's own reference:
https://slurm.schedmd.com/sbatch.html and https://slurm.schedmd.com/srun.html).
The training block is the whole cluster (4 nodes), so every rung of a scaling ladder fits, and blocks do not
take whole nodes: the one-node stage block and the training block share the machine instead of waiting for
each other. A non-exclusive block holds one CPU per node, so ``srun`` gets ``--overcommit`` to start up to
2 ranks per node (tests/slurm/README.md). The four nodes share this machine's cores, so every rank runs one
OpenMP thread: with torch's default of one per core, two ranks' spin-waiting threads made a 0.2 s step take
1-12 s, and a scaling ladder's rungs too noisy to judge.
"""

from __future__ import annotations

from pathlib import Path

from parsl.config import Config

from site_configs import batch
from site_configs.schema import SiteConfig

DEFAULTS = {
    "name": "local-slurm",
    "scheduler": "slurm",
    "partition": "batch",
    "queues": {"batch": {"max_walltime": "24:00:00", "max_nodes": 4}},
    "walltime": "00:30:00",
    "nodes_per_block": 4,
    "exclusive": False,
    "launcher_options": ["--overcommit"],
    "cores_per_node": 2,
    "backend": "gloo",
    "address": "127.0.0.1",
    "stage_workers": 2,
    "retries": 1,
    "environment": {"OMP_NUM_THREADS": "1"},
}


def parsl_config(site: SiteConfig, run_dir: Path) -> Config:
    # Jobs start at once here: poll every second, not every 5 s, or waiting dominates a test run.
    return batch.parsl_config(site, run_dir, strategy_period=1.0)
