"""Aurora (ALCF): PBS Pro, 6 Intel GPU Max 1550 per node with 2 tiles each: 12 ranks per node, xccl.

Follows the ALCF Aurora documentation: running jobs
(https://docs.alcf.anl.gov/aurora/running-jobs-aurora/: ``qsub -A PROJECT -q QUEUE``, ``#PBS -l
select=N``, ``#PBS -l place=scatter``, the filesystems a job needs in ``#PBS -l filesystems=home:flare``;
queues ``debug`` (1-2 nodes, 1 h), ``debug-scaling`` (up to 31 nodes, 1 h), ``prod``; 208 hardware threads
per node) and CPU binding for 12 ranks per node with ``mpiexec --ppn 12
--cpu-bind=list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100`` (8 cores per tile,
cores 0 and 52 left to the system); PyTorch (https://docs.alcf.anl.gov/aurora/data-science/frameworks/pytorch/):
the ``xccl`` backend, ``LOCAL_RANK`` from ``PALS_LOCAL_RANKID`` (janus.launch reads it), ``module load
frameworks``, and ``TMPDIR=/tmp`` against ``AF_UNIX path too long``. The data/export/evaluate blocks use
the ``debug`` queue (one node, one hour; a task cut off by the walltime is retried in a new block).
"""

from __future__ import annotations

DEFAULTS = {
    "name": "aurora",
    "scheduler": "pbs",
    "requires_account": True,
    "partition": "debug",
    "queues": {
        "debug": {"max_walltime": "01:00:00", "max_nodes": 2},
        "debug-scaling": {"max_walltime": "01:00:00", "max_nodes": 31},
        "prod": {"max_walltime": "24:00:00"},
    },
    "walltime": "01:00:00",
    "nodes_per_block": 1,
    "gpus_per_node": 12,
    "device_memory_gib": 64,
    "cpus_per_node": 208,
    "backend": "xccl",
    "cpu_bind": "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100",
    "filesystems": "home:flare",
    "scheduler_options": ["-l place=scatter"],
    "worker_init": "module load frameworks",
    "environment": {"TMPDIR": "/tmp"},
    "stage_partition": "debug",
    "stage_workers": 12,
    "retries": 2,
}
