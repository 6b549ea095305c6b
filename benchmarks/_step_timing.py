"""Times training steps and reads their peak memory in one way for our models and for the peers.

Imported by ``bench_model.py`` and by ``_peers_model.py``, which runs in the peers' venv: torch and the
standard library only. On a GPU every step is bracketed by ``torch.cuda.synchronize`` and the peak is
``torch.cuda.max_memory_allocated`` (parameters, activations, optimizer state); on the CPU the peak is the
process's ``ru_maxrss``, so run one model per process.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 1e9


def time_steps(
    step: Callable[[], None], steps: int, device: torch.device, after_each: Callable[[], object] | None = None
) -> dict:
    """Run ``step`` once untimed, then ``steps`` times; the best step is the figure (shared machines).

    ``after_each``, if given, runs untimed right after every timed step; its results are ``after_each``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 1e9
    else:
        base = rss_gb()
    times, cpu_times, faults, after = [], [], [], []
    for i in range(steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start)
        if after_each is not None and i > 0:
            after.append(after_each())
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "step_s": min(times[1:]),
        "median_step_s": statistics.median(times[1:]),
        "step_times_s": times,
        "cpu_step_s": min(cpu_times[1:]),
        "cpu_step_times_s": cpu_times,
        # pages the kernel zeroed on first touch: fresh memory from the allocator, the host's cost
        "minor_faults_per_step": statistics.median(faults[1:]),
        "peak_gb": peak,
        "step_gb": peak - base,
        **({"after_each": after} if after_each is not None else {}),
    }


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_flops(event: torch.autograd.profiler_util.FunctionEventAvg) -> int:
    """FLOPs of all calls of a matmul event averaged by input shape (``mm``, ``addmm``, ``bmm``)."""
    shapes = event.input_shapes[1:] if event.key == "aten::addmm" else event.input_shapes
    a, b = shapes[0], shapes[1]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1] * event.count


def profile_step(step: Callable[[], None], device: torch.device, step_s: float) -> dict:
    """Where one step's time goes: the share in matmul kernels (``mm``, ``addmm``, ``bmm``), and those
    kernels' own FLOP rate (their FLOPs from the input shapes over their time): FLOP efficiency is the
    share times that rate over the reference matmul's (up to the profiler's overhead). Also how many
    ``MulBackward0`` nodes the backward passes run. On a GPU also the kernels launched and their summed
    time over ``step_s`` (the unprofiled step time): the GPU's busy share, which is low when the host,
    launching kernels one by one, sets the pace."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        step()
    events = profiler.key_averages(group_by_input_shape=True)
    matmuls = [e for e in events if e.key in MATMULS]
    flops = sum(matmul_flops(e) for e in matmuls)
    mul_backward = sum(e.count for e in events if e.key == "MulBackward0")
    if not cuda:
        matmul_us = sum(e.self_cpu_time_total for e in matmuls)
        return {
            "matmul_time_share": matmul_us / sum(e.self_cpu_time_total for e in events),
            "matmul_kernel_flops_per_s": flops / matmul_us * 1e6,
            "mul_backward_nodes": mul_backward,
        }
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    matmul_us = sum(e.device_time_total for e in matmuls)
    return {
        "matmul_time_share": matmul_us / total,
        "matmul_kernel_flops_per_s": flops / matmul_us * 1e6,
        "mul_backward_nodes": mul_backward,
        "kernels": sum(e.count for e in kernels),
        "gpu_busy": total / 1e6 / step_s,
    }
