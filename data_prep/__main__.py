"""``python -m data_prep INPUT... --out DIR``: prepare shards serially with a progress bar."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from data_prep.config import DataConfig, DataWarning
from data_prep.pipeline import finalize, plan_chunks, write_chunk
from data_prep.validate import StrictModeError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="extxyz(.gz), ASE .db, MPtrj .json, .aselmdb files"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--format", default="auto", choices=["auto", "extxyz", "asedb", "mptrj", "aselmdb"])
    parser.add_argument("--strict", action="store_true", help="fail on the first rejected record")
    parser.add_argument("--cutoff", type=float, default=6.0, help="two-body graph cutoff, Å")
    parser.add_argument("--three-body-cutoff", type=float, default=4.0, help="line-graph cutoff, Å")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--shard-size", type=int, default=1000, help="structures per shard")
    parser.add_argument(
        "--max-volume-per-atom",
        type=float,
        default=1000.0,
        help="reject fully periodic cells with more volume per atom, Å³ (0: no bound)",
    )
    parser.add_argument(
        "--keep-isolated-atoms",
        action="store_true",
        help="accept structures with an atom that has no neighbour within the cutoff",
    )
    parser.add_argument(
        "--default-task", default=None, help="task of records without one (default: file stem)"
    )
    return parser.parse_args(argv)


def warning_printer(console: Console, default: Callable) -> Callable:
    """``warnings.showwarning`` that prints a `DataWarning` as one line on the console (the default shows
    the source line that raised it, which is no use here) and leaves other warnings to ``default``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DataWarning):
            console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    with warnings.catch_warnings():
        warnings.showwarning = warning_printer(console, warnings.showwarning)
        return run(args, console)


def run(args: argparse.Namespace, console: Console) -> int:
    try:
        config = DataConfig(
            sources=args.inputs,
            format=args.format,
            strict=args.strict,
            cutoff=args.cutoff,
            three_body_cutoff=args.three_body_cutoff,
            val_fraction=args.val_fraction,
            shard_size=args.shard_size,
            default_task=args.default_task,
            max_volume_per_atom=args.max_volume_per_atom or None,
            reject_isolated_atoms=not args.keep_isolated_atoms,
        )
    except ValidationError as error:
        console.print(f"[red]invalid settings:[/red] {error}")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        chunks = plan_chunks(config)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        results = []
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("records", total=sum(c.stop - c.start for c in chunks))
            for chunk in chunks:
                progress.update(bar, description=Path(chunk.source).name)
                results.append(write_chunk(chunk, config, args.out))
                progress.advance(bar, chunk.stop - chunk.start)
        data = finalize(args.out, config, results)
    except StrictModeError as error:
        console.print(f"[red]strict mode: {escape(str(error))}[/red]", soft_wrap=True)
        return 1
    except (OSError, ValueError, ImportError) as error:  # OSError: a missing input, a directory, a full disk
        console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
        return 1
    summary(data, args.out, sum(r.reused for r in results))
    return 0


def summary(data: dict, out: Path, reused: int) -> None:
    table = Table(title=f"{out}: {data['n_structures']} structures, {data['n_rejected']} rejected")
    for column in ("task", "train", "val", "E/atom mean (eV)", "force rms (eV/Å)"):
        table.add_column(column)
    for name, s in data["task_stats"].items():
        mean = "-" if s["energy_per_atom_mean"] is None else f"{s['energy_per_atom_mean']:.4f}"
        rms = "-" if s["force_rms"] is None else f"{s['force_rms']:.4f}"
        table.add_row(name, str(s["count"]), str(s["count_val"]), mean, rms)
    console = Console()
    console.print(table)
    console.print(
        f"{len(data['shards'])} shards ({reused} chunks reused); quarantine: {out / 'quarantine.jsonl'}"
    )


if __name__ == "__main__":
    sys.exit(main())
