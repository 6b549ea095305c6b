"""HDF5 shards: many structures per file, ragged arrays concatenated and indexed by offsets.

Schema version 3 (file attributes: ``schema_version``, ``split`` ("train"/"val"), ``source`` (input path),
``index_type`` ("int"/"str"), ``tasks`` (JSON list of the task names used in this shard), ``cutoff``,
``n_structures``, ``n_atoms``, ``n_edges``). Datasets, for ``n`` structures, ``N`` atoms, ``E`` edges:

    atom_offset (n+1,) int64     structure k owns atoms atom_offset[k]:atom_offset[k+1]
    edge_offset (n+1,) int64     and edges edge_offset[k]:edge_offset[k+1]
    numbers (N,) uint8, positions (N, 3) f8 Å, forces (N, 3) f8 eV/Å, magmoms (N,) f8 μB
    edge_index (E, 2) uint       centre i, neighbour j, local to the structure
    edge_shift (E, 3) int        cell shift of j: bond = pos[j] + shift @ cell - pos[i]
    cell (n, 3, 3) f8, pbc (n, 3) bool, energy (n,) f8 eV, stress (n, 3, 3) f8 eV/Å³ (ASE sign),
    has_stress (n,) bool, has_magmoms (n,) bool (absent labels are stored as zeros),
    task (n,) int32 index into the shard's ``tasks`` attribute (the manifest's global task list is only
    known after all chunks finish, so readers map local to global indices), charge (n,) f8,
    spin (n,) f8 multiplicity, record_id (n,) str: the record's id in ``source``, n_triplets (n,) int64:
    line-graph triplets at the data's ``three_body_cutoff`` (the loader's triplet budget; new in version 2).

The edge arrays take the narrowest integer type that holds the shard's values (uint8/16/32 indices, int8/16/32
shifts; new in version 3, when they were int32): they were ~95% of a crystal shard's raw bytes, and deflate's
time goes with the bytes it reads. On data/crystals_pbe this cut a crystal's shard write from 0.18 to 0.11 ms
(one-off timing of ``write_shard``) and its bytes from 4.9 to 3.3 kB (``benchmarks/bench_data_prep.py``).
Readers cast them to int64.

Arrays are chunked along the first axis, byte-shuffled and deflated at level 1. Not lzf: liblzf leaves its
hash table uninitialised, so the same records gave different bytes (and sha256) from one write to the next,
and a redone shard could not be told from a changed one. ``benchmarks/bench_data_prep.py`` on
data/crystals_pbe (int32 edges, version 2): 4.9 kB per structure against lzf's 7.5, at the same end-to-end
rate; a one-off timing of random ``GraphDataset`` reads on the bundled sample gave 2,100 structures/s for
both codecs. The shuffle filter had cut lzf shards on data/crystals_pbe from 9.0 to 7.1 kB per structure.

Stored vs rebuilt: shards hold the 6 Å two-body graph (edges + integer cell shifts); the 4 Å line graph
(triplets of bonds sharing a centre) is rebuilt per batch by ``matris.model.line_graph`` on the device that
runs the model. Measured by ``benchmarks/bench_data_prep.py`` on data/crystals_pbe (2 shared cores): 5,304
triplets per structure would add 11.2 kB per structure (int32 pairs, lzf + shuffle) to the 7.5 kB then, i.e.
2.5x the shard bytes and the read/decompress time, and would freeze the model's ``three_body_cutoff`` into
the data. Rebuilding measured 9.1 ms per structure on CPU in 512-atom batches under a load average of 6.7
(0.2 µs per triplet on an idle core: ~1 ms), on the GPU less, against CPU training steps of 0.1 s (tiny) and
1 s (matris-6l) per structure (``benchmarks/bench_loader.py``). Molecules: 237 triplets, 0.3 kB, 0.7 ms.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from data_prep.validate import Record
from matris.graph import bond_lengths
from matris.io import write_atomic

SCHEMA_VERSION = 3
CHUNK_ROWS = {"structure": 1024, "atom": 4096, "edge": 16384}


def _narrowest(values: np.ndarray, types: tuple[type, ...]) -> np.ndarray:
    """``values`` as the first of ``types`` that holds them all."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    kind = next(t for t in types if np.iinfo(t).min <= low and high <= np.iinfo(t).max)
    return values.astype(kind)


def _put(f: h5py.File, name: str, data: np.ndarray, kind: str) -> None:
    """One dataset, without HDF5's modification time so that a rewritten shard has the same sha256."""
    if len(data) == 0:
        f.create_dataset(name, data=data, track_times=False)
        return
    chunks = (min(len(data), CHUNK_ROWS[kind]), *data.shape[1:])
    f.create_dataset(
        name,
        data=data,
        chunks=chunks,
        compression="gzip",
        compression_opts=1,
        shuffle=True,
        track_times=False,
    )


def write_shard(path: Path, records: Sequence[Record], split: str, source: str, cutoff: float) -> dict:
    """Write ``records`` to ``path`` atomically (temp file + ``os.replace``); return its manifest entry.

    The file is built in memory (HDF5's core driver, the same bytes as a file on disk) and written by
    `write_atomic`: when the disk filled up under HDF5's own writes, its clean-up failed and the process
    crashed (h5py 3.16, HDF5 2.0); a failed plain write is an OSError naming the shard, and leaves no
    partial file."""
    tasks = sorted({r.task for r in records})
    n_atoms = np.array([len(r.numbers) for r in records], dtype=np.int64)
    n_edges = np.array([r.edge_index.shape[1] for r in records], dtype=np.int64)
    zeros3 = np.zeros((3, 3))
    with h5py.File(f"{path}.in-memory", "w", driver="core", backing_store=False) as f:
        f.attrs.update(
            schema_version=SCHEMA_VERSION,
            split=split,
            source=source,
            index_type="int" if all(isinstance(r.index, int) for r in records) else "str",
            tasks=json.dumps(tasks),
            cutoff=cutoff,
            n_structures=len(records),
            n_atoms=int(n_atoms.sum()),
            n_edges=int(n_edges.sum()),
        )
        _put(f, "atom_offset", np.concatenate([[0], np.cumsum(n_atoms)]), "structure")
        _put(f, "edge_offset", np.concatenate([[0], np.cumsum(n_edges)]), "structure")
        _put(f, "numbers", np.concatenate([r.numbers for r in records]).astype(np.uint8), "atom")
        _put(f, "positions", np.concatenate([r.positions for r in records]), "atom")
        _put(f, "forces", np.concatenate([r.forces for r in records]), "atom")
        magmoms = [r.magmoms if r.magmoms is not None else np.zeros(len(r.numbers)) for r in records]
        _put(f, "magmoms", np.concatenate(magmoms), "atom")
        edge_index = np.concatenate([r.edge_index.T for r in records])
        _put(f, "edge_index", _narrowest(edge_index, (np.uint8, np.uint16, np.uint32)), "edge")
        edge_shift = np.concatenate([r.edge_shift for r in records])
        _put(f, "edge_shift", _narrowest(edge_shift, (np.int8, np.int16, np.int32)), "edge")
        _put(f, "cell", np.stack([r.cell for r in records]), "structure")
        _put(f, "pbc", np.stack([r.pbc for r in records]), "structure")
        _put(f, "energy", np.array([r.energy for r in records]), "structure")
        _put(
            f,
            "stress",
            np.stack([r.stress if r.stress is not None else zeros3 for r in records]),
            "structure",
        )
        _put(f, "has_stress", np.array([r.stress is not None for r in records]), "structure")
        _put(f, "has_magmoms", np.array([r.magmoms is not None for r in records]), "structure")
        _put(f, "task", np.array([tasks.index(r.task) for r in records], dtype=np.int32), "structure")
        _put(f, "charge", np.array([r.charge for r in records]), "structure")
        _put(f, "spin", np.array([r.spin for r in records]), "structure")
        ids = np.array([str(r.index) for r in records], dtype=h5py.string_dtype())
        _put(f, "record_id", ids, "structure")
        _put(f, "n_triplets", np.array([r.n_triplets for r in records], dtype=np.int64), "structure")
        f.flush()
        image = f.id.get_file_image()
    write_atomic(path, image)
    return {
        "file": path.name,
        "split": split,
        "n_structures": len(records),
        "n_atoms": int(n_atoms.sum()),
        "n_edges": int(n_edges.sum()),
        "sha256": hashlib.sha256(image).hexdigest(),
    }


def read_index(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Atom offsets, edge offsets, triplet counts and local task names: all a loader needs before reading
    records."""
    with h5py.File(path, "r") as f:
        check_schema(f)
        return f["atom_offset"][:], f["edge_offset"][:], f["n_triplets"][:], json.loads(f.attrs["tasks"])


def edges_within(path: Path, cutoff: float, atom_offset: np.ndarray, edge_offset: np.ndarray) -> np.ndarray:
    """Edges per structure shorter than ``cutoff`` (below the shard's graph cutoff), from one read of the
    shard's positions, cells and edges."""
    with h5py.File(path, "r") as f:
        positions, cell = f["positions"][:], f["cell"][:]
        edge_index, edge_shift = f["edge_index"][:].astype(np.int64), f["edge_shift"][:].astype(np.float64)
    structure = np.repeat(np.arange(len(edge_offset) - 1), np.diff(edge_offset))
    first_atom = atom_offset[:-1][structure]
    lengths = bond_lengths(positions, cell[structure], edge_index[:, 0] + first_atom,
                           edge_index[:, 1] + first_atom, edge_shift)  # fmt: skip
    return np.bincount(structure[lengths < cutoff], minlength=len(edge_offset) - 1).astype(np.int64)


def check_schema(f: h5py.File) -> None:
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{f.filename}: shard schema version {version}, this code reads {SCHEMA_VERSION}; "
            "rerun data preparation (python -m data_prep, or the pipeline's data stage) to rewrite it"
        )


def load(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every dataset of a shard in memory, and its attributes (for sequential reads)."""
    with h5py.File(path, "r") as f:
        check_schema(f)
        arrays = {name: f[name].asstr()[:] if name == "record_id" else f[name][:] for name in f}
        attrs = dict(f.attrs)
    attrs["tasks"] = json.loads(attrs["tasks"])
    return arrays, attrs


def structure(arrays, k: int, atom_offset: np.ndarray, edge_offset: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays of structure ``k`` from h5py datasets by name (reads its slices only) or ``load``'s dict."""
    a0, a1 = int(atom_offset[k]), int(atom_offset[k + 1])
    e0, e1 = int(edge_offset[k]), int(edge_offset[k + 1])
    out = {name: arrays[name][a0:a1] for name in ("numbers", "positions", "forces", "magmoms")}
    out.update({name: arrays[name][e0:e1] for name in ("edge_index", "edge_shift")})
    for name in ("cell", "pbc", "energy", "stress", "has_stress", "has_magmoms", "task", "charge", "spin"):
        out[name] = arrays[name][k]
    return out
