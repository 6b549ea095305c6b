"""Line attention's bucket as the C++ op of `matris.cpu_kernels` against the compiled bmm form it replaces.

    python benchmarks/bench_line_kernel.py [--input FILE] [--repeats 7] [--json PATH]

On random float32 operands shaped as the buckets of the issue's batch (the first 32 structures of
``crystals_pbe.extxyz.gz`` with at least 12 Å³ per atom) for ``matris-6l`` (8 heads of 16 channels, 8 angle
channels), at the three derivative levels of a training step, each the best of ``--repeats`` with the two
forms alternating: the forward alone (no autograd), forward and backward, and forward, backward with
``create_graph=True`` and the double backward of a loss on the gradients (the training pattern). The bmm
form runs as training runs it without the op: the compiled weights kernel of `matris.fused` and batched
matmuls. Before timing, the op's output, gradients and second derivatives are checked against the plain bmm
form (largest difference relative to the largest value, float32); a mismatch ends the run with exit 1.
Needs x86-64 with AVX2; the first run builds the extension (about a minute).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_fused import bucket_shapes
from bench_model import DATA, MODELS, labelled_batch, select
from rich.console import Console
from rich.table import Table

from matris import cpu_kernels
from matris.layers import line_attention_bucket

LEVELS = {"forward": "fwd", "backward": "fwd+bwd", "double_backward": "fwd+bwd+double bwd"}


def bucket_operands(g: int, m: int, h: int, c: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 operands of one bucket in the model's layout; the envelope is zero on the diagonal."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    envelope = torch.rand(g, 1, m, m, generator=generator) * (1 - torch.eye(m))
    return dict(
        q=randn(g, m, h, c),
        k=randn(g, m, h, c),
        v=randn(g, m, h, c),
        qa=randn(g, m, h, width),
        envelope=envelope,
        angle=randn(g, m, width, m),
        angle_v=randn(h, width, 1, c),
    )


def three_levels(bucket: Callable, x: dict, grad: torch.Tensor, cap: float) -> list[torch.Tensor]:
    """Output, the seven gradients, and the second derivatives of a loss on them, as a force loss takes."""
    x = {name: t.detach().requires_grad_() for name, t in x.items()}
    grad = grad.detach().requires_grad_()
    out = bucket(**x, cap=cap)
    first = torch.autograd.grad(out, list(x.values()), grad, create_graph=True)
    loss = sum(f.square().sum() for f in first)
    return [out, *first, *torch.autograd.grad(loss, [grad, *x.values()])]


def check(cap: float) -> float:
    """Largest relative difference of the op from the plain bmm form over its three levels."""
    x = bucket_operands(6, 11, 8, 16, cpu_kernels.ANGLE_WIDTH)
    grad = torch.randn(6, 11, 8, 16, generator=torch.Generator().manual_seed(1))
    kernel = three_levels(cpu_kernels.line_attention, x, grad, cap)
    plain = three_levels(lambda **a: line_attention_bucket(**a, fused=False), x, grad, cap)
    return max(((k - p).abs().max() / p.abs().max()).item() for k, p in zip(kernel, plain, strict=True))


def best_ms(ops: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each op over ``repeats`` rounds, the ops alternating, after one warm-up round."""
    times = {name: [] for name in ops}
    for repeat in range(repeats + 1):
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def bmm_form(**x) -> torch.Tensor:
    """The bucket as training runs it without the op: compiled weights kernel and batched matmuls."""
    enabled, cpu_kernels._State.enabled = cpu_kernels._State.enabled, False
    try:
        return line_attention_bucket(**x, fused=True)
    finally:
        cpu_kernels._State.enabled = enabled


def time_bucket(x: dict, cap: float, repeats: int) -> dict[str, float]:
    """Milliseconds of each form at each level."""
    grad = torch.randn_like(x["q"])
    forms = {"bmm": bmm_form, "kernel": cpu_kernels.line_attention}
    result = {}
    for level in LEVELS:

        def run(form: Callable, level: str = level) -> None:
            if level == "forward":
                with torch.no_grad():
                    form(**x, cap=cap)
            elif level == "backward":
                inputs = {name: t.detach().requires_grad_() for name, t in x.items()}
                torch.autograd.grad(form(**inputs, cap=cap), list(inputs.values()), grad)
            else:
                three_levels(form, x, grad, cap)

        ops = {name: (lambda form=form: run(form)) for name, form in forms.items()}
        result |= {f"{level}_{name}_ms": ms for name, ms in best_ms(ops, repeats).items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DATA / "crystals_pbe.extxyz.gz")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = MODELS["matris-6l"]
    h, c, width, cap = (
        config.num_heads,
        config.dim // config.num_heads,
        config.num_angular + 1,
        config.score_cap,
    )
    start = time.perf_counter()
    probe = bucket_operands(1, 2, h, c, width)
    if not cpu_kernels.line_applies(probe["q"], probe["qa"]):
        raise SystemExit("matris.cpu_kernels does not apply here (it needs x86-64 with AVX2 and a C++ build)")
    build_s = time.perf_counter() - start
    error = check(cap)
    if error > 1e-4:
        raise SystemExit(f"matris.cpu_kernels.line_attention differs from the plain bmm form by {error:.2e}")

    shapes = bucket_shapes(labelled_batch(select(args.input, 32), config.cutoff), config)
    rows = {
        f"{g} × {m}": time_bucket(bucket_operands(g, m, h, c, width), cap, args.repeats) for g, m in shapes
    }
    rows["all buckets (one block)"] = {
        key: sum(r[key] for r in rows.values()) for key in next(iter(rows.values()))
    }

    table = Table(
        title=f"line attention's bucket, matris-6l (h={h}, c={c}, L+1={width}), float32, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}; largest relative difference from the "
        f"plain form over three levels {error:.0e}; built or loaded in {build_s:.0f} s"
    )
    table.add_column("bucket (blocks × size)")
    for label in LEVELS.values():
        for column in (f"{label}: bmm ms", "kernel ms", "bmm ÷ kernel"):
            table.add_column(column, justify="right")
    for name, r in rows.items():
        cells = [name]
        for level in LEVELS:
            bmm, kernel = r[f"{level}_bmm_ms"], r[f"{level}_kernel_ms"]
            cells += [f"{bmm:.1f}", f"{kernel:.1f}", f"{bmm / kernel:.2f}"]
        table.add_row(*cells)
    Console(width=200).print(table)
    report = {"max_relative_error": error, "build_s": build_s, "buckets": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
