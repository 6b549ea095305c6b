"""The CPU training step under glibc's malloc and under tcmalloc, side by side.

    python benchmarks/bench_allocator.py [--rounds 2] [--model matris-6l] [--tcmalloc PATH] [--json PATH]

Every fresh edge-sized tensor of a step (26,992 × 256 floats on the issue's batch) can be new pages that
the kernel zeroes on first touch; tcmalloc keeps freed spans for reuse. This runs ``bench_model.py
--only MODEL`` (the issue's batch, best of 3 steps) alternately without and with ``LD_PRELOAD`` of
``--tcmalloc`` (found by ``ctypes.util.find_library`` if not given; Debian: ``libtcmalloc-minimal4``),
so machine drift hits both alike, and prints each round with the minor page faults per step.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

BENCH_MODEL = Path(__file__).with_name("bench_model.py")


def step_figures(model: str, preload: str) -> dict:
    """``bench_model.py``'s result for ``model`` in a process tree with ``preload`` (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, str(BENCH_MODEL), "--only", model, "--json", str(report)]
        subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(report.read_text())["results"][model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="matris-6l", choices=["matris-6l", "matris-6l-moe"])
    parser.add_argument("--tcmalloc", default=ctypes.util.find_library("tcmalloc_minimal") or "")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.tcmalloc:
        raise SystemExit("tcmalloc not found: install libtcmalloc-minimal4 or pass --tcmalloc PATH")
    rounds = [
        {"glibc": step_figures(args.model, ""), "tcmalloc": step_figures(args.model, args.tcmalloc)}
        for _ in range(args.rounds)
    ]
    table = Table(title=f"{args.model} training step, issue batch, glibc malloc vs {args.tcmalloc}")
    columns = ["round", "step s glibc / tcmalloc", "glibc ÷ tcmalloc", "page faults/step", "peak GB",
               "FLOP eff."]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for i, r in enumerate(rounds, 1):
        glibc, tc = r["glibc"], r["tcmalloc"]
        table.add_row(
            str(i),
            f"{glibc['step_s']:.2f} / {tc['step_s']:.2f}",
            f"{glibc['step_s'] / tc['step_s']:.2f}",
            f"{glibc['minor_faults_per_step']:,.0f} / {tc['minor_faults_per_step']:,.0f}",
            f"{glibc['peak_gb']:.2f} / {tc['peak_gb']:.2f}",
            f"{glibc['flop_efficiency']:.0%} / {tc['flop_efficiency']:.0%}",
        )
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
