"""MoE at the published widths: deferred expert initialisation, and the user's path end to end.

The end-to-end test runs `benchmarks/bench_moe_train.py`'s stages (the commands users type: torchrun of
`janus.train`, `janus.export`, `evaluation.evaluate`) on moe-s reduced to one block of 8 experts (dim 768,
expert width 1152 as moe-s; 54 M parameters): 2 steps on 2 gloo ranks with the experts sharded over both
and FSDP, a checkpoint, 1 more step resumed on 1 rank, an export pruned to the data's elements, and an
evaluation of the pruned file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from matris.config import ModelConfig
from matris.model import MatRIS
from matris.moe import Experts, deferred_experts, materialize_experts

ROOT = Path(__file__).resolve().parent.parent


def test_deferred_experts_initialise_like_a_full_build_row_by_row():
    """A model built with its experts on the meta device and then materialised equals one built
    directly, and any rows of an `Experts` module's initial values equal those rows of the full weights:
    a rank can initialise exactly its shard (`janus.expert_parallel.ExpertShard`)."""
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(3)
    built = MatRIS(config)
    torch.manual_seed(3)
    with deferred_experts():
        deferred = MatRIS(config)
    experts = next(m for m in deferred.modules() if isinstance(m, Experts))
    assert experts.w1.is_meta and not next(deferred.parameters()).is_meta
    rows = experts.initial(1, 2, torch.float64)
    materialize_experts(deferred)
    assert not any(p.is_meta for p in deferred.parameters())
    for name, value in built.state_dict().items():
        torch.testing.assert_close(deferred.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for name, value in rows.items():
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, getattr(experts, name)[1:3].double(), rtol=0, atol=0)


def test_moe_s_widths_train_shard_resume_on_fewer_ranks_export_pruned_and_evaluate(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    # plain ops, as the other multi-process tests: building the C++ kernels takes minutes on 2 cores
    monkeypatch.setenv("MATRIS_CPU_KERNELS", "0")
    from benchmarks import bench_moe_train

    args = argparse.Namespace(
        preset="moe-s", blocks=1, experts=8, top_k=2, ranks=2, resume_ranks=1, steps=2, resume_steps=1,
        max_atoms=8, out=tmp_path / "run",
    )  # fmt: skip
    result = bench_moe_train.bench(args)

    assert 50e6 < result["parameters"] < 60e6
    train, resume = result["stages"]["train"], result["stages"]["resume"]
    assert train["layout"] == {"dp": 1, "graph": 1, "expert": 2}
    assert "resumed from" in resume["log"] and "step_000000002" in resume["log"]
    steps = result["steps"]
    assert [(r["step"], r["world_size"]) for r in steps] == [(1, 2), (2, 2), (3, 1)]
    assert all(math.isfinite(r["loss"]) for r in steps)
    # H, C and O with 2 experts each reach at most 6 of the 8
    assert result["export"]["pruned_from_experts"] == 8 and result["export"]["num_experts"] <= 6
    scores = result["eval"]["molecule-gfn2"]
    assert scores["n_structures"] > 0 and math.isfinite(scores["force_mae_mev_per_a"])
    # measured: 1.2-1.5 GiB per training rank, 1.9-2.1 GiB for the one resumed rank, which holds all state
    trained, resumed = list(train["peak_rss_bytes"].values()), list(resume["peak_rss_bytes"].values())
    assert len(trained) == 2 and all(0 < p < 2 * 2**30 for p in trained), trained
    assert len(resumed) == 1 and 0 < resumed[0] < 2.75 * 2**30, resumed
    assert sum(trained) < 3.5 * 2**30
    print(bench_moe_train.report(result), file=sys.stderr)
