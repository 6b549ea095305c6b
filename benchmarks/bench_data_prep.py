"""Data-preparation throughput: our pipeline end to end against MACE's and CHGNet's graph construction.

    python benchmarks/bench_data_prep.py [--input FILE ...] [--frames N] [--repeats N] [--peers-python PATH]

Ours: ``plan_chunks`` (a counting pass over the file) → ``write_chunk`` (read, validate, 6 Å graph with
vesin, HDF5 shard) → ``finalize`` (manifest), into a temp dir, in 1 process and in 2 (a process pool over
chunks, as the Parsl apps run them). Peers run in their own venv (``--peers-python``) through
``_peers_graphs.py``: the same frames read once with ASE, then MACE's ``AtomicData.from_config`` (r_max 6 Å)
and CHGNet's ``CrystalGraphConverter`` (6 Å atom graph, 4 Å bond graph; crystals only). Their "total" is
read + graph; they write nothing. Every time is the median of ``--repeats`` runs (default 3), ours and the
peers' alike: on this 2-core machine one run varies by up to ~20%. ``--loader-read`` also times
``ase.io.read(path, ":")``, the call MACE's ``load_from_xyz`` makes, which seeks in gzip streams and is
quadratic in the frame count.

Also measured, for the stored-vs-rebuilt decision in ``data_prep.shards``: the line-graph triplets
(``matris.model.line_graph`` at 4 Å) per structure, the bytes they would add to a shard, and the time to
rebuild them per structure when batches of ~512 atoms are collated.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from itertools import repeat
from pathlib import Path

import h5py
import numpy as np
import torch
from pymatgen.optimization.neighbors import find_points_in_spheres
from rich.console import Console
from rich.table import Table

from data_prep import BatchPlan, DataConfig, GraphDataset, finalize, plan_chunks, write_chunk
from data_prep.readers import count_records
from data_prep.readers import extxyz as extxyz_reader
from matris.batch import collate
from matris.graph import neighbor_graph, vesin_graph
from matris.model import line_graph

DATA = Path(__file__).resolve().parents[1] / "sample_data"  # every crystal and molecule of the shared data
HELPER = Path(__file__).with_name("_peers_graphs.py")
SHARD_SIZE = 250  # chunks of 250 records: several per file, so two processes share the work evenly
WARMUP_FRAMES = 20


def prepare_once(path: Path, frames: int, processes: int, out: Path) -> tuple[dict, float]:
    """Plan → write every chunk (serially or in a pool) → finalize over the first ``frames`` records; the
    manifest and the wall time."""
    config = DataConfig(sources=[path], shard_size=SHARD_SIZE)
    start = time.perf_counter()
    chunks = [replace(c, stop=min(c.stop, frames)) for c in plan_chunks(config) if c.start < frames]
    if processes == 1:
        results = [write_chunk(c, config, out) for c in chunks]
    else:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            results = list(pool.map(write_chunk, chunks, repeat(config), repeat(out)))
    data = finalize(out, config, results)
    return data, time.perf_counter() - start


def run_ours(path: Path, frames: int, processes: int, out: Path, repeats: int) -> dict:
    """The median time of ``repeats`` preparations, each into a fresh directory (nothing reused); the last
    one's output stays in ``out``."""
    seconds = []
    for k in range(repeats):
        target = out if k == repeats - 1 else out.with_name(f"{out.name}-{k}")
        data, elapsed = prepare_once(path, frames, processes, target)
        seconds.append(elapsed)
    elapsed = statistics.median(seconds)
    n = data["n_structures"] + data["n_rejected"]
    return {
        "structures": n,
        "total_s": elapsed,
        "rate": n / elapsed,
        "bytes_per_structure": sum((out / s["file"]).stat().st_size for s in data["shards"]) / n,
        "edges_per_structure": sum(s["n_edges"] for s in data["shards"]) / data["n_structures"],
    }


def best_time(run, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def components(path: Path, frames: int) -> dict:
    """Per structure, best of 3: the neighbour search as ``matris.graph`` runs it against vesin alone, and
    the gzip seeks to every chunk start with the reader's gzip class against the standard library's (the
    two choices the module docstrings explain)."""
    atoms = [a for _, a in extxyz_reader.read(path, 0, frames) if not isinstance(a, Exception)]
    inputs = [(np.ascontiguousarray(a.positions), a.cell.array, a.pbc) for a in atoms]
    out = {
        "search_ms": best_time(lambda: [neighbor_graph(*x, 6.0) for x in inputs]) / len(inputs) * 1e3,
        "vesin_ms": best_time(lambda: [vesin_graph(*x, 6.0) for x in inputs]) / len(inputs) * 1e3,
    }
    if path.suffix == ".gz":
        n, marks = extxyz_reader.offsets(path, SHARD_SIZE)  # every chunk start of the whole file
        for name, gzip_file in (("reader", extxyz_reader.GzipFile), ("stdlib", gzip.GzipFile)):

            def seeks(gzip_file=gzip_file) -> None:
                for mark in marks:
                    with io.BufferedReader(gzip_file(path, "rb"), 1 << 16) as fh:
                        fh.seek(mark)

            out[f"seek_{name}_ms"] = best_time(seeks) / n * 1e3
    return out


def sparse_search(n_atoms: int = 500, span: float = 1000.0) -> dict:
    """A sparse open structure (``n_atoms`` over ``span`` Å): ``matris.graph`` (vesin, by its bin rule)
    against pymatgen's dense grid, each once."""
    positions = np.random.default_rng(0).uniform(0.0, span, (n_atoms, 3))
    no_pbc = np.zeros(3, dtype=bool)
    return {
        "atoms": n_atoms,
        "span": span,
        "search_s": best_time(lambda: neighbor_graph(positions, np.zeros((3, 3)), no_pbc, 6.0), 1),
        "pymatgen_s": best_time(
            lambda: find_points_in_spheres(positions, positions, 6.0, np.zeros(3, np.int64), np.eye(3)), 1
        ),
    }


def triplets(data_dir: Path, three_body_cutoff: float, max_atoms: int = 512) -> dict:
    """Triplets per structure, their lzf+shuffle int32 storage cost, and the batched rebuild time."""
    dataset = GraphDataset(data_dir, split=None)
    graphs = [dataset[i] for i in range(len(dataset))]
    pairs, seconds = [], 0.0
    for indices in BatchPlan(dataset.sizes, max_atoms=max_atoms, shuffle=False).batches(0):
        batch = collate([graphs[i] for i in indices], dtype=torch.float64)
        i, j = batch.edge_index
        cells = batch.cell[batch.atom_structure[i]]
        shifts = torch.einsum("ek,ekl->el", batch.edge_shift, cells)
        vectors = batch.positions[j] - batch.positions[i] + shifts
        lengths = vectors.norm(dim=-1)
        start = time.perf_counter()
        a, b = line_graph(batch.edge_index, lengths, three_body_cutoff)
        seconds += time.perf_counter() - start
        pairs.append(torch.stack([a, b], dim=1).to(torch.int32).numpy())
    stacked = np.concatenate(pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "triplets.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("triplets", data=stacked, chunks=(16384, 2), compression="lzf", shuffle=True)
        stored = path.stat().st_size
    n = len(graphs)
    return {
        "structures": n,
        "triplets_per_structure": len(stacked) / n,
        "stored_bytes_per_structure": stored / n,
        "rebuild_us_per_structure": seconds / n * 1e6,
    }


def run_peers(
    python: str, path: Path, frames: int, repeats: int, loader_read: bool, console: Console
) -> dict | None:
    if not Path(python).exists():
        console.print(f"[yellow]peers skipped: {python} not found (see benchmarks/README.md)[/yellow]")
        return None
    command = [python, str(HELPER), "--input", str(path), "--frames", str(frames), "--repeats", str(repeats)]
    if loader_read:
        command.append("--loader-read")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(f"[yellow]peers failed on {path.name}:[/yellow] {done.stderr.strip()[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows_for(name: str, result: dict) -> list[dict]:
    """Table rows (tool, structures, read, graph, total, rate, bytes, edges) for one input."""
    rows = [
        {
            "tool": f"ours, {p} process{'es' if p > 1 else ''}",
            "ours": p,
            "structures": result[f"ours_{p}p"]["structures"],
            "read_s": None,
            "graph_s": None,
            **{k: result[f"ours_{p}p"][k] for k in ("total_s", "rate", "bytes_per_structure")},
            "edges": result[f"ours_{p}p"]["edges_per_structure"],
        }
        for p in (1, 2)
    ]
    peers = result.get("peers") or {}
    for peer, label in (("mace", "MACE"), ("chgnet", "CHGNet")):
        entry = peers.get(peer)
        if entry is None:
            continue
        if entry["status"] != "ok":
            rows.append({"tool": f"{label}: skipped ({entry['reason']})"})
            continue
        total = peers["read_s"] + entry["convert_s"]
        rows.append(
            {
                "tool": label,
                "structures": peers["structures"],
                "read_s": peers["read_s"],
                "graph_s": entry["convert_s"],
                "total_s": total,
                "rate": peers["structures"] / total,
                "bytes_per_structure": entry["bytes_per_structure"],
                "edges": entry["edges_per_structure"],
            }
        )
        if peer == "mace" and "loader_read_s" in peers:
            total = peers["loader_read_s"] + entry["convert_s"]
            rows.append(
                {
                    "tool": "MACE, read as load_from_xyz does",
                    "structures": peers["structures"],
                    "read_s": peers["loader_read_s"],
                    "graph_s": entry["convert_s"],
                    "total_s": total,
                    "rate": peers["structures"] / total,
                    "bytes_per_structure": entry["bytes_per_structure"],
                    "edges": entry["edges_per_structure"],
                }
            )
    for row in rows:
        row["input"] = name
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(console: Console, rows: list[dict], trip: dict[str, dict], report: dict) -> None:
    title = (
        f"data preparation, {os.cpu_count()} cores, load average {report['load_average']:.1f} at start, "
        f"extxyz parsed by {report['extxyz_parser']}, median of {report['repeats']} runs"
    )
    table = Table(title=f"{title} (ratios: ours 1 process / 2 processes)")
    columns = ("input", "tool", "structures", "read s", "graph s", "total s", "structures/s", "ours ÷ tool")
    for column in (*columns, "bytes/structure", "edges/structure"):
        table.add_column(column, justify="left" if column in ("input", "tool") else "right")
    ours = {(r["input"], r["ours"]): r["rate"] for r in rows if "ours" in r}
    for r in rows:
        if "rate" not in r:
            table.add_row(r["input"], r["tool"], *["-"] * 8)
            continue
        ratio = "-"
        if "ours" not in r:
            ratio = f"{ours[r['input'], 1] / r['rate']:.2f} / {ours[r['input'], 2] / r['rate']:.2f}"
        table.add_row(
            r["input"],
            r["tool"],
            str(r["structures"]),
            fmt(r["read_s"], ".2f"),
            fmt(r["graph_s"], ".2f"),
            fmt(r["total_s"], ".2f"),
            fmt(r["rate"], ",.0f"),
            ratio,
            fmt(r["bytes_per_structure"], ",.0f"),
            fmt(r["edges"], ",.0f"),
        )
    console.print(table)
    table = Table(title="line-graph triplets (4 Å): store or rebuild")
    columns = ("input", "triplets/structure", "stored kB/structure", "rebuild µs/structure (512-atom batch)")
    for column in columns:
        table.add_column(column, justify="left" if column == "input" else "right")
    for name, t in trip.items():
        table.add_row(
            name,
            f"{t['triplets_per_structure']:,.0f}",
            f"{t['stored_bytes_per_structure'] / 1e3:.1f}",
            f"{t['rebuild_us_per_structure']:.0f}",
        )
    console.print(table)
    table = Table(title="components, ms per structure (best of 3): neighbour search and gzip seeks to chunks")
    columns = ("input", "matris.graph", "vesin alone", "seeks: reader's gzip", "seeks: standard library")
    for column in columns:
        table.add_column(column, justify="left" if column == "input" else "right")
    for name, result in report["inputs"].items():
        c = result["components"]
        keys = ("search_ms", "vesin_ms", "seek_reader_ms", "seek_stdlib_ms")
        table.add_row(name, *(fmt(c.get(k), ".3f") for k in keys))
    console.print(table)
    s = report["sparse"]
    console.print(
        f"sparse open structure, {s['atoms']} atoms over {s['span']:.0f} Å: "
        f"matris.graph {s['search_s']:.3f} s, pymatgen's dense grid {s['pymatgen_s']:.2f} s"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--input",
        nargs="+",
        type=Path,
        default=[DATA / "crystals_pbe.extxyz.gz", DATA / "molecules_gfn2.extxyz.gz"],
        help="extxyz(.gz) files (default: the bundled crystals_pbe and molecules_gfn2 files)",
    )
    parser.add_argument("--frames", type=int, default=None, help="first N frames of each file (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--peers-python", default="/work/peers-venv/bin/python")
    parser.add_argument("--loader-read", action="store_true", help='time ase.io.read(path, ":") too')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=200)
    missing = [str(p) for p in args.input if not p.is_file()]
    if missing:
        console.print(f"[red]error:[/red] input file not found: {', '.join(missing)}")
        return 1
    report: dict = {
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "extxyz_parser": "ASE" if extxyz_reader._fastxyz is None else "libextxyz",
        "repeats": args.repeats,
        "inputs": {},
    }
    rows, trip = [], {}
    for path in args.input:
        frames = count_records(path) if args.frames is None else min(args.frames, count_records(path))
        result: dict = {"frames": frames}
        with tempfile.TemporaryDirectory() as tmp:
            prepare_once(path, WARMUP_FRAMES, 1, Path(tmp) / "warmup")  # imports and first-call costs
            for processes in (1, 2):
                out = Path(tmp) / f"ours-{processes}"
                result[f"ours_{processes}p"] = run_ours(path, frames, processes, out, args.repeats)
            config = DataConfig(sources=[path])
            result["triplets"] = triplets(Path(tmp) / "ours-1", config.three_body_cutoff)
        result["components"] = components(path, frames)
        result["peers"] = run_peers(args.peers_python, path, frames, args.repeats, args.loader_read, console)
        for row in rows_for(path.name, result):
            if "rate" in row and "ours" not in row:
                result.setdefault("ratios", {})[row["tool"]] = {
                    "ours_1p": result["ours_1p"]["rate"] / row["rate"],
                    "ours_2p": result["ours_2p"]["rate"] / row["rate"],
                }
            rows.append(row)
        trip[path.name] = result["triplets"]
        report["inputs"][path.name] = result
    report["sparse"] = sparse_search()
    print_tables(console, rows, trip, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
