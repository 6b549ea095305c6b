"""Frontier (OLCF): Slurm, 8 MI250X GCDs per node, RCCL through the nccl backend.

Follows the OLCF Frontier User Guide (https://docs.olcf.ornl.gov/systems/frontier_user_guide.html: ``-A``
is required; partition ``batch`` runs 1-91 nodes for 2 h, 92-183 for 6 h, 184-9,408 for 12 h; partition
``extended`` up to 64 nodes for 24 h; 56 usable cores per node, ``srun -c7 --gpus-per-task=1
--gpu-bind=closest`` maps one rank to each GCD next to its cores) and its PyTorch guide
(https://docs.olcf.ornl.gov/software/analytics/pytorch_frontier.html: launch ranks with ``srun``, not
``torchrun``; ``NCCL_SOCKET_IFNAME=hsn0``; the libfabric/RCCL variables below, "recommended by HPE and AMD
on Frontier for best performance at scale"; the alternative rendezvous protocol needs both ``#SBATCH
--network=disable_rdzv_get`` and ``FI_CXI_RDZV_PROTO=alt_read``; MIOpen's cache on node-local /tmp).
Set ``worker_init`` (module loads, environment activation) and ``account`` in your sites.yaml.
"""

from __future__ import annotations

DEFAULTS = {
    "name": "frontier",
    "scheduler": "slurm",
    "requires_account": True,
    "partition": "batch",
    "queues": {
        "batch": {
            "max_walltime": "12:00:00",
            "max_nodes": 9408,
            "walltime_by_nodes": {91: "02:00:00", 183: "06:00:00"},
        },
        "extended": {"max_walltime": "24:00:00", "max_nodes": 64},
    },
    "walltime": "02:00:00",
    "nodes_per_block": 1,
    "gpus_per_node": 8,
    "device_memory_gib": 64,
    "backend": "nccl",
    "launcher_options": ["-c7", "--gpus-per-task=1", "--gpu-bind=closest"],
    "scheduler_options": ["--network=disable_rdzv_get"],
    "environment": {
        "FI_CXI_RDZV_PROTO": "alt_read",
        "FI_MR_CACHE_MONITOR": "kdreg2",
        "FI_CXI_DEFAULT_CQ_SIZE": "131072",
        "FI_CXI_DEFAULT_TX_SIZE": "2048",
        "FI_CXI_RX_MATCH_MODE": "hybrid",
        "NCCL_NET_GDR_LEVEL": "3",
        "NCCL_CROSS_NIC": "1",
        "NCCL_SOCKET_IFNAME": "hsn0",
        "MIOPEN_USER_DB_PATH": "/tmp/miopen-cache",
        "MIOPEN_CUSTOM_CACHE_DIR": "/tmp/miopen-cache",
    },
    "stage_workers": 8,
    "retries": 2,
}
