"""The benchmarks' own arithmetic: what their tables report is computed, not assumed."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._step_timing import MATMULS, matmul_flops, profile_step


def test_matmul_flops_from_profiled_shapes_match_flop_counter():
    """"matmul eff." divides FLOPs read off the profiler's input shapes by the matmuls' time: for mm,
    addmm (bias first) and bmm, those FLOPs equal torch's FlopCounterMode, also through autograd."""
    a = torch.randn(37, 16, requires_grad=True)
    w, bias = torch.randn(16, 24, requires_grad=True), torch.randn(24)
    batched = torch.randn(5, 24, 7, requires_grad=True)

    def step() -> None:
        y = torch.addmm(bias, a, w) @ w.T  # addmm, mm
        z = torch.bmm(y[:5 * 7].view(5, 7, 16) @ w, batched)  # matmul as bmm of (5, 7, 16)·(16, 24), bmm
        z.sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    with torch.profiler.profile(record_shapes=True) as profiler:
        step()
    events = profiler.key_averages(group_by_input_shape=True)
    assert {e.key for e in events} >= set(MATMULS)
    assert sum(matmul_flops(e) for e in events if e.key in MATMULS) == counter.get_total_flops()
    report = profile_step(step, torch.device("cpu"), step_s=1.0)
    assert report["matmul_kernel_flops_per_s"] > 0
    assert 0 < report["matmul_time_share"] < 1
