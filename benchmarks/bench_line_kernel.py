"""Fused C++ forms of line attention's bucket (``line_kernel_prototype.cpp``) against the model's bmm form.

    python benchmarks/bench_line_kernel.py [--input FILE] [--repeats 7] [--json PATH]

The question it answers: how much faster can line attention's bucket (scores, sink softmax, α_ab θ̃_ab,l
and the value sum) run on a CPU when nothing of size (g, h, m, L + 1, m) goes through memory, as the 40 %
FLOP-efficiency target of ``matris-6l`` needs (benchmarks/README.md)? Two prototypes, compiled on first use
(``torch.utils.cpp_extension``, g++ ``-O3 -march=native -ffast-math -fopenmp``): "loops", forward and
backward as plain loops per (block, head, row) that the compiler vectorises, checked against
`matris.layers.line_attention_bucket` in float64 (the output and every input's gradient); and "blocked",
forward and backward written with AVX2 intrinsics so that a row's value sums stay in vector registers
(float32, 16 channels per head, 8 angle channels; x86-64 with glibc), checked in float32. Timed on random
inputs shaped as the buckets of the issue's batch (the first 32 structures of ``crystals_pbe.extxyz.gz``
with at least 12 Å³ per atom), float32: the forward (no autograd), and forward plus backward. The model's
form runs as in training (the compiled weights kernel of `matris.fused`, batched matmuls). Best of
``--repeats``, the forms alternating. Neither prototype has a double backward.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_fused import bucket_shapes
from bench_model import DATA, MODELS, labelled_batch, select
from rich.console import Console
from rich.table import Table
from torch.utils.cpp_extension import load

from matris.layers import line_attention_bucket

SOURCE = Path(__file__).with_name("line_kernel_prototype.cpp")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# the kernels blocked by hand need AVX2 with FMA and glibc's libmvec (its vector exp)
BLOCKED = platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def bucket_inputs(g: int, m: int, h: int, c: int, width: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs of one bucket in the model's layout; the envelope is zero on the diagonal."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    envelope = torch.rand(g, 1, m, m, generator=generator, dtype=dtype) * (1 - torch.eye(m, dtype=dtype))
    return dict(
        q=randn(g, m, h, c),
        k=randn(g, m, h, c),
        v=randn(g, m, h, c),
        qa=randn(g, m, h, width),
        envelope=envelope,
        angle=randn(g, m, width, m),
        angle_v=randn(h, width, 1, c),
    )


def prototype_args(x: dict) -> list[torch.Tensor]:
    """The prototype's operands, envelope (g, m, m) and angle_v (h, L + 1, c), made contiguous: the
    kernels index raw data pointers and would read a strided tensor wrongly."""
    operands = [
        x["q"],
        x["k"],
        x["v"],
        x["qa"],
        x["envelope"].squeeze(1),
        x["angle"],
        x["angle_v"].squeeze(2),
    ]
    return [t.contiguous() for t in operands]


def check(kernel, cap: float) -> dict[str, float]:
    """Largest relative differences from the model's form, output and gradients: the loops' in float64, the
    blocked kernels' (float32 only) in float32."""
    errors = {
        "loops, float64": difference(kernel.forward, kernel.backward, (5, 7, 3, 4, 5), torch.float64, cap)
    }
    if BLOCKED:
        errors["blocked, float32"] = difference(
            kernel.forward_blocked, kernel.backward_blocked, (6, 11, 8, 16, 8), torch.float32, cap
        )
    return errors


def difference(forward, backward, sizes: tuple[int, ...], dtype: torch.dtype, cap: float) -> float:
    x = {name: t.requires_grad_() for name, t in bucket_inputs(*sizes, dtype).items()}
    out = line_attention_bucket(**x, cap=cap, fused=False)
    grad = torch.randn_like(out).contiguous()
    expected = [out, *torch.autograd.grad(out, list(x.values()), grad)]
    args = [t.detach() for t in prototype_args(x)]
    got = [forward(*args, cap), *backward(grad, *args, cap)]
    return max(relative_error(e, g) for e, g in zip(expected, got, strict=True))


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    return ((expected.reshape(got.shape) - got).abs().max() / expected.abs().max()).item()


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


def time_bucket(kernel, x: dict, cap: float, repeats: int) -> dict[str, float]:
    """Milliseconds of the forward, and of forward + backward, of each form."""
    args = prototype_args(x)
    grad = torch.randn_like(x["q"]).contiguous()

    def model_forward() -> None:
        with torch.no_grad():
            line_attention_bucket(**x, cap=cap)

    def model_backward() -> None:
        inputs = {name: t.detach().requires_grad_() for name, t in x.items()}
        torch.autograd.grad(line_attention_bucket(**inputs, cap=cap), list(inputs.values()), grad)

    def loops_backward() -> None:
        kernel.forward(*args, cap)
        kernel.backward(grad, *args, cap)

    def blocked_backward() -> None:
        kernel.forward_blocked(*args, cap)
        kernel.backward_blocked(grad, *args, cap)

    forwards = {"model": model_forward, "loops": lambda: kernel.forward(*args, cap)}
    backwards = {"model": model_backward, "loops": loops_backward}
    if BLOCKED:
        forwards["blocked"] = lambda: kernel.forward_blocked(*args, cap)
        backwards["blocked"] = blocked_backward
    forward = best_ms(forwards, repeats)
    backward = best_ms(backwards, repeats)
    return {
        **{f"forward_{name}_ms": t for name, t in forward.items()},
        **{f"fwd_bwd_{name}_ms": t for name, t in backward.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DATA / "crystals_pbe.extxyz.gz")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = MODELS["matris-6l"]
    start = time.perf_counter()
    links = ["-fopenmp", "-lmvec"] if BLOCKED else ["-fopenmp"]
    kernel = load("matris_line_kernel_prototype", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=links)
    build_s = time.perf_counter() - start
    errors = check(kernel, config.score_cap)
    for name, error in errors.items():
        if error > (1e-10 if "float64" in name else 1e-5):
            raise SystemExit(f"{SOURCE.name} ({name}) differs from the model's form by {error:.2e}")

    h, width = config.num_heads, config.num_angular + 1
    shapes = bucket_shapes(labelled_batch(select(args.input, 32), config.cutoff), config.three_body_cutoff)
    rows = {}
    for g, m in shapes:
        x = bucket_inputs(g, m, h, config.dim // h, width, torch.float32)
        rows[f"{g} × {m}"] = time_bucket(kernel, x, config.score_cap, args.repeats)
    rows["all buckets (one block)"] = {
        key: sum(r[key] for r in rows.values()) for key in next(iter(rows.values()))
    }

    checked = ", ".join(f"{name} {error:.0e}" for name, error in errors.items())
    table = Table(
        title=f"line attention's bucket, matris-6l (h={h}, c={config.dim // h}, L+1={width}), float32, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}; largest relative difference from the "
        f"model's form: {checked}; built in {build_s:.0f} s"
    )
    columns = {
        "bucket (blocks × size)": lambda name, r: name,
        "fwd model ms": lambda name, r: f"{r['forward_model_ms']:.1f}",
        "fwd loops ms": lambda name, r: f"{r['forward_loops_ms']:.1f}",
        "fwd blocked ms": lambda name, r: f"{r['forward_blocked_ms']:.1f}" if BLOCKED else "-",
        "model ÷ blocked": lambda name, r: (
            f"{r['forward_model_ms'] / r['forward_blocked_ms']:.2f}" if BLOCKED else "-"
        ),
        "fwd+bwd model ms": lambda name, r: f"{r['fwd_bwd_model_ms']:.1f}",
        "fwd+bwd loops ms": lambda name, r: f"{r['fwd_bwd_loops_ms']:.1f}",
        "fwd+bwd blocked ms": lambda name, r: f"{r['fwd_bwd_blocked_ms']:.1f}" if BLOCKED else "-",
        "model ÷ blocked ": lambda name, r: (
            f"{r['fwd_bwd_model_ms'] / r['fwd_bwd_blocked_ms']:.2f}" if BLOCKED else "-"
        ),
    }
    for column in columns:
        table.add_column(column, justify="left" if column.startswith("bucket") else "right")
    for name, r in rows.items():
        table.add_row(*(cell(name, r) for cell in columns.values()))
    Console(width=200).print(table)
    report = {"max_relative_errors": errors, "build_s": build_s, "buckets": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
