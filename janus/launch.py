"""Find rank, world size, local rank and the rendezvous address from whatever launched us.

One entry point serves torchrun, Slurm's srun, PBS/PALS mpiexec, any MPI launcher (through mpi4py) and a
plain single process, so the same `python -m janus.train` line works on a laptop and on Frontier/Aurora.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | pals | mpi | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment; no side effects, so it is testable with a crafted dict."""
    env = dict(os.environ if environ is None else environ)
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _slurm_first_node_address(nodes),
            master_port=_job_port(env, env.get("SLURM_STEP_ID", "0") + env.get("SLURM_JOB_ID", "0")),
            launcher="slurm",
        )
    if "PALS_RANKID" in env:
        return DistEnv(
            rank=int(env["PALS_RANKID"]),
            world_size=int(env.get("PMI_SIZE") or env["PALS_SIZE"]),
            local_rank=int(env.get("PALS_LOCAL_RANKID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_line(env.get("PBS_NODEFILE")),
            master_port=_job_port(env, env.get("PBS_JOBID", "0")),
            launcher="pals",
        )
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return _from_mpi(env, port)
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port() if "MASTER_PORT" not in env else port, "single")


def init_process_group(env: DistEnv, timeout_s: float = 600.0) -> str:
    """Initialise torch.distributed for ``env`` with the backend that fits the device; return the backend."""
    backend = backend_for_device()
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "xpu":
        torch.xpu.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{_bracket(env.master_addr)}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return backend


def backend_for_device() -> str:
    """nccl on CUDA and ROCm (RCCL answers to the nccl name), xccl on Intel GPUs, gloo on CPU."""
    if torch.cuda.is_available():
        return "nccl"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xccl"
    return "gloo"


def device_for(env: DistEnv) -> torch.device:
    """Pin one accelerator per local rank; CPU when there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", env.local_rank % torch.xpu.device_count())
    return torch.device("cpu")


def _job_port(env: dict[str, str], job_key: str) -> int:
    """A port derived from the job id, so concurrent jobs sharing a node rarely collide."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    digits = "".join(ch for ch in job_key if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def _slurm_first_node_address(nodelist: str) -> str:
    """First node of a Slurm node list, resolved through Slurm (node names need not be host names)."""
    if not nodelist:
        return "127.0.0.1"
    first = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    return node_address(first)


def node_address(node: str) -> str:
    """NodeAddr of a Slurm node (loopback clusters name nodes n1..n4 that DNS does not know)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", node], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    for token in out.split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1]
    return node


def _from_mpi(env: dict[str, str], port: int) -> DistEnv:
    """Any MPI launcher: ranks from mpi4py, rank 0's address broadcast to all."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = comm.bcast(env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname()), root=0)
    port = comm.bcast(port if "MASTER_PORT" in env else _free_port(), root=0)
    return DistEnv(comm.Get_rank(), comm.Get_size(), local.Get_rank(), addr, port, "mpi")


def _first_line(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return "127.0.0.1"
    with open(path) as handle:
        return handle.readline().strip() or "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr
