"""LUMI-G (CSC/EuroHPC): Slurm, 8 MI250X GCDs per node, RCCL through the nccl backend.

Follows the LUMI documentation: partitions (https://docs.lumi-supercomputer.eu/runjobs/scheduled-jobs/partitions/:
``standard-g`` allocates whole nodes, up to 1024 of them for 2 days; ``small-g`` up to 4 nodes for 3 days;
``dev-g`` up to 32 nodes for 3 h; ``--account=project_...`` is required) and CPU/GPU binding
(https://docs.lumi-supercomputer.eu/runjobs/scheduled-jobs/distribution-binding/: each GCD is closest to one
CCD, in the order that ``--cpu-bind=mask_cpu:fe000000000000,fe00000000000000,fe0000,fe000000,fe,fe00,
fe00000000,fe0000000000`` encodes, 7 cores per rank with the first core of each CCD left to the system).
All GCDs stay visible to every rank (LUMI advises against ``--gpu-bind``, which breaks GPU-to-GPU
communication inside a node); janus pins local rank i to GCD i, matching mask i. RCCL uses the Slingshot
interfaces ``hsn0..3`` (https://lumi-supercomputer.github.io/LUMI-EasyBuild-docs/p/PyTorch/).
"""

from __future__ import annotations

DEFAULTS = {
    "name": "lumi",
    "scheduler": "slurm",
    "requires_account": True,
    "partition": "standard-g",
    "queues": {
        "standard-g": {"max_walltime": "48:00:00", "max_nodes": 1024},
        "small-g": {"max_walltime": "72:00:00", "max_nodes": 4},
        "dev-g": {"max_walltime": "03:00:00", "max_nodes": 32},
    },
    "walltime": "02:00:00",
    "nodes_per_block": 1,
    "gpus_per_node": 8,
    "device_memory_gib": 64,
    "request_gpus": True,
    "backend": "nccl",
    "cpu_bind": "mask_cpu:fe000000000000,fe00000000000000,fe0000,fe000000,fe,fe00,fe00000000,fe0000000000",
    "environment": {
        "NCCL_SOCKET_IFNAME": "hsn0,hsn1,hsn2,hsn3",
        "MIOPEN_USER_DB_PATH": "/tmp/miopen-cache",
        "MIOPEN_CUSTOM_CACHE_DIR": "/tmp/miopen-cache",
    },
    "stage_workers": 8,
    "retries": 2,
}
