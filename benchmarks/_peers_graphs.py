"""Time MACE's and CHGNet's graph construction on the first frames of an extxyz(.gz) file; print JSON.

Run by ``bench_data_prep.py`` with the peers' interpreter (``/work/peers-venv/bin/python``), so mace-torch
and chgnet never share a venv with this project. Reading is timed the fastest way ASE offers for a gzip file
(decompress into memory, then ``ase.io.read`` of the text; ``ase.io.read(path.gz, ":")`` seeks in the gzip
stream and runs ~100x slower), and both peers convert the same ``ase.Atoms`` list. Each time is the median of
``--repeats`` runs, as for our pipeline; the ``load_from_xyz``-style read, ~50 s, is timed once.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import statistics
import time

import ase.io
import torch
from ase import Atoms

WARMUP = 5  # frames converted untimed first, so lazy imports and first-call costs are not timed


def timed(run, repeats: int) -> tuple[object, float]:
    """The last result of ``run()`` and the median of its ``repeats`` wall times."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    return result, statistics.median(seconds)


def read_frames(path: str, frames: int) -> list[Atoms]:
    with open(path, "rb") as fh:
        raw = fh.read()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
    return ase.io.read(io.StringIO(text), f":{frames}", format="extxyz")


def serialized_bytes(graphs: list) -> int:
    buffer = io.BytesIO()
    torch.save(graphs, buffer)
    return buffer.tell()


def mace(frames: list[Atoms], cutoff: float, repeats: int) -> dict:
    from mace.data import AtomicData, config_from_atoms
    from mace.data.utils import KeySpecification
    from mace.tools import AtomicNumberTable

    keys = KeySpecification(
        info_keys={"energy": "REF_energy", "stress": "REF_stress"}, arrays_keys={"forces": "REF_forces"}
    )
    z_table = AtomicNumberTable(sorted({int(z) for atoms in frames for z in atoms.numbers}))

    def convert(batch: list[Atoms]) -> list:
        configs = [config_from_atoms(a, key_specification=keys) for a in batch]
        return [AtomicData.from_config(c, z_table=z_table, cutoff=cutoff) for c in configs]

    convert(frames[:WARMUP])
    graphs, elapsed = timed(lambda: convert(frames), repeats)
    return {
        "convert_s": elapsed,
        "edges_per_structure": sum(g.edge_index.shape[1] for g in graphs) / len(graphs),
        "bytes_per_structure": serialized_bytes(graphs) / len(graphs),
    }


def chgnet(frames: list[Atoms], cutoff: float, bond_cutoff: float, repeats: int) -> dict:
    from chgnet.graph import CrystalGraphConverter
    from pymatgen.io.ase import AseAtomsAdaptor

    if not all(a.pbc.all() for a in frames):
        raise ValueError("CHGNet's converter takes periodic crystals only")
    converter = CrystalGraphConverter(atom_graph_cutoff=cutoff, bond_graph_cutoff=bond_cutoff)

    def convert(batch: list[Atoms]) -> list:
        return [converter(AseAtomsAdaptor.get_structure(a)) for a in batch]

    convert(frames[:WARMUP])
    graphs, elapsed = timed(lambda: convert(frames), repeats)
    return {
        "convert_s": elapsed,
        "edges_per_structure": sum(g.atom_graph.shape[0] for g in graphs) / len(graphs),
        "triplets_per_structure": sum(g.bond_graph.shape[0] for g in graphs) / len(graphs),
        "bytes_per_structure": serialized_bytes(graphs) / len(graphs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True)
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--cutoff", type=float, default=6.0)
    parser.add_argument("--bond-cutoff", type=float, default=4.0)
    parser.add_argument("--loader-read", action="store_true", help='also time ase.io.read(path, ":N")')
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    frames, read_s = timed(lambda: read_frames(args.input, args.frames), args.repeats)
    out: dict = {"structures": len(frames), "read_s": read_s, "torch_threads": torch.get_num_threads()}
    if args.loader_read:
        start = time.perf_counter()
        ase.io.read(args.input, f":{args.frames}")
        out["loader_read_s"] = time.perf_counter() - start
    runs = {
        "mace": lambda: mace(frames, args.cutoff, args.repeats),
        "chgnet": lambda: chgnet(frames, args.cutoff, args.bond_cutoff, args.repeats),
    }
    for name, run in runs.items():
        try:
            out[name] = {"status": "ok", **run()}
        except ImportError as error:
            out[name] = {"status": "skipped", "reason": f"not installed: {error}"}
        except ValueError as error:
            out[name] = {"status": "skipped", "reason": str(error)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
