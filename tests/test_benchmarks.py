"""The benchmarks' own arithmetic: what their tables report is computed, not assumed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._step_timing import MATMULS, matmul_flops, profile_step


def test_matmul_flops_from_profiled_shapes_match_flop_counter():
    """ "matmul eff." divides FLOPs read off the profiler's input shapes by the matmuls' time: for mm,
    addmm (bias first) and bmm, those FLOPs equal torch's FlopCounterMode, also through autograd."""
    a = torch.randn(37, 16, requires_grad=True)
    w, bias = torch.randn(16, 24, requires_grad=True), torch.randn(24)
    batched = torch.randn(5, 24, 7, requires_grad=True)

    def step() -> None:
        y = torch.addmm(bias, a, w) @ w.T  # addmm, mm
        z = torch.bmm(y[: 5 * 7].view(5, 7, 16) @ w, batched)  # matmul as bmm of (5, 7, 16)·(16, 24), bmm
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


def test_bench_model_variants_are_validated_before_any_model_runs(monkeypatch, tmp_path, capsys):
    """``--variant`` changes fields of ``matris-6l``: values parse as JSON, a misspelt field or a bad value
    stops the run with exit code 1 before a model process starts."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from benchmarks import bench_model

    config = bench_model.variant_config("num_heads=4,three_body_cutoff=1")
    assert (config.num_heads, config.three_body_cutoff) == (4, 1.0)
    assert config.model_dump(exclude={"num_heads", "three_body_cutoff"}) == bench_model.MODELS[
        "matris-6l"
    ].model_dump(exclude={"num_heads", "three_body_cutoff"})
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        bench_model.variant_config("num_heads")
    with pytest.raises(ValueError, match="not divisible"):
        bench_model.variant_config("num_heads=5")

    started = []
    monkeypatch.setattr(bench_model, "run_json", lambda *args: started.append(args))
    data = tmp_path / "frames.extxyz"
    data.write_text("")
    assert bench_model.main(["--input", str(data), "--only", "matris-6l", "--variant", "num_head=4"]) == 1
    assert "num_head" in capsys.readouterr().out and not started


def test_bench_accuracy_report_holds_the_single_task_runs_and_their_targets(tmp_path, monkeypatch):
    """The report of a mixed run with ``--single-task``: one table per task, each task's own run beside the
    mixed one, and the negative-transfer line; the plot skips runs without a curve."""
    from rich.console import Console

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_accuracy

    scores = {"energy_mae_mev_per_atom": 9.0, "force_mae_mev_per_a": 60.0, "force_zero_mae_mev_per_a": 200.0,
              "force_cosine": 0.9, "stress_mae_mev_per_a3": None}  # fmt: skip
    run = {"tasks": {"a": scores, "b": scores}, "train_seconds": 600.0, "epochs": 2.0}
    run["curve"] = {"a": [(1, 2)]}
    single = {t: {"tasks": {t: {**scores, "force_mae_mev_per_a": 40.0}}, "train_seconds": 99.0, "epochs": 2.0}
              for t in ("a", "b")}  # fmt: skip
    results = {"budget_s": 600.0, "steps": None, "runs": {"ours": run, "single-task": single}}
    console = Console(width=200, record=True)
    lines = bench_accuracy.report(results, console)
    text = console.export_text()
    assert "a: held-out errors after 600 s budgets" in text and "single-task" in text
    assert "a: force MAE 1.50x the same model trained on it alone (target ≤ 1.2: missed)" in lines
    bench_accuracy.plot(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
