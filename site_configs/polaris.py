"""Polaris (ALCF): PBS Pro, 4 NVIDIA A100 per node, NCCL.

Follows the ALCF Polaris documentation (https://docs.alcf.anl.gov/polaris/running-jobs/: ``qsub -A PROJECT
-q QUEUE``, ``#PBS -l select=N:system=polaris``, ``#PBS -l place=scatter``, ``#PBS -l
filesystems=home:eagle``; queues ``debug`` (1-2 nodes, 1 h), ``debug-scaling`` (up to 10 nodes, 1 h),
``prod`` (10-496 nodes: up to 24 nodes 3 h, up to 99 nodes 6 h, larger 24 h), ``preemptable`` (up to 10
nodes, 72 h); 32 cores (64 hardware threads) per node, so 4 ranks per node run with ``mpiexec --ppn 4
--depth=8 --cpu-bind depth``). Parsl's own Polaris example (parsl/configs/polaris.py) requests
``ngpus=4`` with ``ncpus=64``. The data/export/evaluate blocks use the ``debug`` queue: ``prod`` does not
take one-node jobs.
"""

from __future__ import annotations

DEFAULTS = {
    "name": "polaris",
    "scheduler": "pbs",
    "requires_account": True,
    "partition": "debug",
    "queues": {
        "debug": {"max_walltime": "01:00:00", "max_nodes": 2},
        "debug-scaling": {"max_walltime": "01:00:00", "max_nodes": 10},
        "prod": {
            "max_walltime": "24:00:00",
            "min_nodes": 10,
            "max_nodes": 496,
            "walltime_by_nodes": {24: "03:00:00", 99: "06:00:00"},
        },
        "preemptable": {"max_walltime": "72:00:00", "max_nodes": 10},
    },
    "walltime": "01:00:00",
    "nodes_per_block": 1,
    "gpus_per_node": 4,
    "device_memory_gib": 40,
    "request_gpus": True,
    "select": "system=polaris",
    "cpus_per_node": 64,
    "backend": "nccl",
    "cpu_bind": "depth",
    "launcher_options": ["--depth=8"],
    "filesystems": "home:eagle",
    "scheduler_options": ["-l place=scatter"],
    "stage_partition": "debug",
    "stage_workers": 8,
    "retries": 2,
}
