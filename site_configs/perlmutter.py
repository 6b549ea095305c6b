"""Perlmutter (NERSC): Slurm, GPU nodes with 4 NVIDIA A100 each, NCCL.

Follows NERSC's documentation (https://docs.nersc.gov/jobs/ and
https://docs.nersc.gov/systems/perlmutter/running-jobs/): GPU nodes are requested with ``--constraint=gpu``
(``-C gpu``) and their GPUs with ``--gpus-per-node=4``; limits are set per QOS (``regular``: up to 48 h;
``debug``: up to 8 nodes for 30 min); 64 cores (128 hardware threads) per node, so 4 ranks bind with
``-c 32 --cpu-bind=cores``; the high-speed interface is ``hsn0``
(https://docs.nersc.gov/machinelearning/pytorch/ for distributed PyTorch). All 4 GPUs stay visible to each
rank (no ``--gpus-per-task``) so NCCL can use NVLink between them; janus pins rank i of a node to GPU i.
"""

from __future__ import annotations

DEFAULTS = {
    "name": "perlmutter",
    "scheduler": "slurm",
    "constraint": "gpu",
    "qos": "regular",
    "limits_by": "qos",
    "queues": {
        "regular": {"max_walltime": "48:00:00"},
        "debug": {"max_walltime": "00:30:00", "max_nodes": 8},
    },
    "walltime": "01:00:00",
    "nodes_per_block": 1,
    "gpus_per_node": 4,
    "device_memory_gib": 40,
    "request_gpus": True,
    "backend": "nccl",
    "cpu_bind": "cores",
    "launcher_options": ["-c32"],
    "environment": {"NCCL_SOCKET_IFNAME": "hsn0"},
    "stage_workers": 8,
    "retries": 2,
}
