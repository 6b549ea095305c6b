"""data_prep on real files: readers, validation and quarantine, shards, manifest, chunk reuse, loader."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list
from pydantic import ValidationError

from data_prep import (
    BatchPlan,
    DataConfig,
    GraphDataset,
    StrictModeError,
    finalize,
    is_complete,
    iter_atoms,
    plan_chunks,
    prepare,
    split_for_ranks,
    write_chunk,
)
from data_prep.__main__ import main as cli
from data_prep.pipeline import problem
from data_prep.readers import count_records, read_records
from data_prep.readers import extxyz as extxyz_reader
from matris.batch import collate
from matris.graph import neighbor_graph
from matris.model import line_graph
from tests.conftest import read_frames

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SAMPLE_FILES = sorted(SAMPLE.glob("*.extxyz.gz"))


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    prepare(DataConfig(sources=SAMPLE_FILES), out)
    return out


def by_record(data_dir: Path, split: str | None = None) -> dict:
    return {(Path(a.info["source"]).name, a.info["index"]): a for a in iter_atoms(data_dir, split)}


def assert_same_labels(stored: Atoms, original: Atoms, stress: np.ndarray | None, magmoms) -> None:
    np.testing.assert_array_equal(stored.numbers, original.numbers)
    np.testing.assert_allclose(stored.positions, original.positions, atol=1e-12)
    np.testing.assert_allclose(stored.cell.array, original.cell.array, atol=1e-12)
    np.testing.assert_array_equal(stored.pbc, original.pbc)
    if stress is None:
        assert "stress" not in stored.calc.results
    else:
        np.testing.assert_allclose(stored.get_stress(voigt=False), stress, atol=1e-10)
    if magmoms is None:
        assert "magmoms" not in stored.calc.results
    else:
        np.testing.assert_allclose(stored.calc.results["magmoms"], magmoms, atol=1e-12)


def test_sample_round_trip(sample_dir):
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    stored = by_record(sample_dir)
    originals = {(p.name, i): a for p in SAMPLE_FILES for i, a in enumerate(read_frames(p))}
    assert manifest["n_rejected"] == 0
    assert manifest["n_structures"] == len(originals) == len(stored) == 4104
    assert manifest["tasks"] == ["alloy-emt", "crystal-pbe", "crystal-r2scan", "molecule-gfn2"]
    assert manifest["n_train"] + manifest["n_val"] == 4104 and 330 < manifest["n_val"] < 490
    for key, original in originals.items():
        atoms = stored[key]
        stress = original.info.get("REF_stress")
        magmoms = original.arrays.get("REF_magmoms")
        assert_same_labels(atoms, original, None if stress is None else stress.reshape(3, 3), magmoms)
        assert atoms.get_potential_energy() == pytest.approx(original.info["REF_energy"], abs=1e-9)
        np.testing.assert_allclose(atoms.get_forces(), original.arrays["REF_forces"], atol=1e-12)
        assert atoms.info["task"] == original.info["task"]
        assert atoms.info["charge"] == original.info.get("charge", 0.0)
        assert atoms.info["spin"] == original.info.get("spin", 1.0)
    assert is_complete(sample_dir)


def test_manifest_statistics(sample_dir):
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    train = list(iter_atoms(sample_dir, "train"))
    assert len(train) == manifest["n_train"]
    for task in manifest["tasks"]:
        frames = [a for a in train if a.info["task"] == task]
        stats = manifest["task_stats"][task]
        assert stats["count"] == len(frames)
        mean = np.mean([a.get_potential_energy() / len(a) for a in frames])
        rms = np.sqrt(np.mean(np.concatenate([a.get_forces().ravel() for a in frames]) ** 2))
        assert stats["energy_per_atom_mean"] == pytest.approx(mean, rel=1e-9)
        assert stats["force_rms"] == pytest.approx(rms, rel=1e-9)
        refs = manifest["reference_energies"][task]
        zs = sorted({int(z) for a in frames for z in a.numbers})
        assert sorted(int(z) for z in refs) == zs
    histogram = {}
    for a in iter_atoms(sample_dir):
        for z in a.numbers:
            histogram[str(z)] = histogram.get(str(z), 0) + 1
    assert manifest["elements"] == dict(sorted(histogram.items(), key=lambda kv: int(kv[0])))
    assert sum(s["n_atoms"] for s in manifest["shards"]) == sum(histogram.values())


def labelled(numbers, positions, cell, pbc, energy, forces, stress=None, magmoms=None, **info) -> Atoms:
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    results = {"energy": energy, "forces": np.asarray(forces)}
    if stress is not None:
        results["stress"] = stress
    if magmoms is not None:
        results["magmoms"] = np.asarray(magmoms)
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info.update(info)
    return atoms


E_REF = {3: -1.5, 8: -4.25, 11: -1.25, 17: -2.0}


def synthetic_frames(n: int, seed: int = 0) -> list[Atoms]:
    """Rattled periodic cells (task "bulk") and open molecules ("mol"); energy linear in composition."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        periodic = k % 2 == 1
        if periodic:
            numbers = rng.choice([3, 8, 11, 17], size=4)
            positions = np.array([[0, 0, 0], [2.1, 0, 0], [0, 2.1, 0], [0, 0, 2.1]]) + rng.normal(
                0, 0.05, (4, 3)
            )
            cell, stress = np.eye(3) * 4.2, rng.normal(0, 0.01, 6)
        else:
            numbers = rng.choice([3, 8, 17], size=3)
            positions = np.array([[0, 0, 0], [0, 0, 1.2], [0, 1.1, 0.3]]) + rng.normal(0, 0.02, (3, 3))
            cell, stress = None, None
        energy = float(sum(E_REF[int(z)] for z in numbers))
        forces = rng.normal(0, 0.5, (len(numbers), 3))
        magmoms = rng.normal(0, 1, len(numbers)) if periodic else None
        info = {"task": "bulk" if periodic else "mol", "charge": float(k % 3 - 1), "spin": float(1 + k % 2)}
        frames.append(labelled(numbers, positions, cell, periodic, energy, forces, stress, magmoms, **info))
    return frames


def check_round_trip(frames: list[Atoms], data_dir: Path, key=lambda k: k) -> None:
    stored = {a.info["index"]: a for a in iter_atoms(data_dir)}
    assert len(stored) == len(frames)
    for k, original in enumerate(frames):
        atoms = stored[key(k)]
        results = original.calc.results
        stress = results.get("stress")
        full = None if stress is None else original.get_stress(voigt=False)
        assert_same_labels(atoms, original, full, results.get("magmoms"))
        assert atoms.get_potential_energy() == pytest.approx(results["energy"], abs=1e-9)
        np.testing.assert_allclose(atoms.get_forces(), results["forces"], atol=1e-12)
        for name in ("task", "charge", "spin"):
            assert atoms.info[name] == original.info[name]


def test_asedb_round_trip_and_reference_energies(tmp_path):
    frames = synthetic_frames(40)
    with ase.db.connect(tmp_path / "synthetic.db") as db:
        for atoms in frames:
            db.write(atoms, task=atoms.info["task"], charge=atoms.info["charge"], spin=atoms.info["spin"])
    manifest = prepare(DataConfig(sources=[tmp_path / "synthetic.db"], val_fraction=0.2), tmp_path / "out")
    assert manifest["n_structures"] == 40 and manifest["n_rejected"] == 0
    check_round_trip(frames, tmp_path / "out", key=lambda k: k + 1)  # ASE db row ids start at 1
    for task, refs in manifest["reference_energies"].items():
        for z, e in refs.items():
            assert e == pytest.approx(E_REF[int(z)], abs=1e-6), (task, z)


def test_aselmdb_round_trip(tmp_path):
    pytest.importorskip("ase_db_backends")
    frames = synthetic_frames(12, seed=1)
    path = tmp_path / "synthetic.aselmdb"
    with ase.db.connect(path, type="aselmdb") as db:
        for atoms in frames:
            db.write(atoms, task=atoms.info["task"], charge=atoms.info["charge"], spin=atoms.info["spin"])
    assert count_records(path) == 12
    assert [i for i, _ in read_records(path, start=3, stop=6)] == [4, 5, 6]
    prepare(DataConfig(sources=[path]), tmp_path / "out")
    check_round_trip(frames, tmp_path / "out", key=lambda k: k + 1)


def test_mptrj_round_trip(tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = read_frames(SAMPLE / "crystals_pbe.extxyz.gz", ":12")
    data: dict = {}
    for k, atoms in enumerate(frames):
        stress_kbar_vasp = -atoms.info["REF_stress"].reshape(3, 3) / (0.1 * units.GPa)
        data.setdefault(f"mp-{k // 4}", {})[f"frame-{k % 4}"] = {
            "structure": AseAtomsAdaptor.get_structure(
                Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
            ).as_dict(),
            "corrected_total_energy": atoms.info["REF_energy"],
            "force": atoms.arrays["REF_forces"].tolist(),
            "stress": stress_kbar_vasp.tolist(),
            "magmom": atoms.arrays["REF_magmoms"].tolist(),
        }
    (tmp_path / "mptrj.json").write_text(json.dumps(data))
    manifest = prepare(
        DataConfig(sources=[tmp_path / "mptrj.json"], default_task="crystal-pbe"), tmp_path / "out"
    )
    assert manifest["tasks"] == ["crystal-pbe"] and manifest["n_structures"] == 12
    stored = {a.info["index"]: a for a in iter_atoms(tmp_path / "out")}
    for k, original in enumerate(frames):
        atoms = stored[f"mp-{k // 4}/frame-{k % 4}"]
        assert_same_labels(
            atoms, original, original.info["REF_stress"].reshape(3, 3), original.arrays["REF_magmoms"]
        )
        assert atoms.get_potential_energy() == pytest.approx(original.info["REF_energy"], abs=1e-9)
        np.testing.assert_allclose(atoms.get_forces(), original.arrays["REF_forces"], atol=1e-12)


GOOD = 'Properties=species:S:1:pos:R:3:REF_forces:R:3 task=mol REF_energy={e} pbc="F F F"'
SINGULAR = 'Lattice="3 0 0 3 0 0 0 0 3" ' + GOOD.format(e=-1.0).replace('pbc="F F F"', 'pbc="T T T"')
BAD_FILE = "".join(
    [
        f"2\n{GOOD.format(e=-1.0)}\nH 0 0 0 0 0 0\nH 0 0 0.74 0 0 0\n",  # 0 good
        f"2\n{GOOD.format(e='nan')}\nH 0 0 0 0 0 0\nH 0 0 0.74 0 0 0\n",  # 1 NaN energy
        f"2\n{GOOD.format(e=-1.0)}\nH 0 0 0 0 0 0\nH 0 0 0.1 0 0 0\n",  # 2 atoms 0.1 Å apart
        '2\nProperties=species:S:1:pos:R:3 REF_energy=-1.0 pbc="F F F"\nH 0 0 0\nH 0 0 0.74\n',  # 3 no forces
        f"2\n{GOOD.format(e=-1.0)}\nX 0 0 0 0 0 0\nH 0 0 0.74 0 0 0\n",  # 4 unknown element
        f"3\n{GOOD.format(e=-2.0)}\nO 0 0 0 0 0 0\nH 0 0 0.96 0 0 0\nH 0.93 0 -0.24 0 0 0\n",  # 5 good
        f"2\n{SINGULAR}\nH 0 0 0 0 0 0\nH 0 0 0.74 0 0 0\n",  # 6 periodic with a singular cell
        f"2\n{GOOD.format(e=-1.0)}\nH 0 0 0.5 0 0 0\nH 0 0 0.5 0 0 0\n",  # 7 two atoms at one point
        f"3\n{GOOD.format(e=-2.0)}\nO 0 0 0 0 0 0\nH 0 0 0.96 0 0 0\n",  # 8 truncated
    ]
)
EXPECTED_FIELDS = {
    1: "energy",
    2: "positions",
    3: "forces",
    4: "numbers",
    6: "cell",
    7: "positions",
    8: "record",
}


def test_quarantine(tmp_path):
    (tmp_path / "bad.extxyz").write_text(BAD_FILE)
    manifest = prepare(DataConfig(sources=[tmp_path / "bad.extxyz"], val_fraction=0.0), tmp_path / "out")
    lines = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert {line["index"]: line["field"] for line in lines} == EXPECTED_FIELDS
    for line in lines:
        assert line["source"] == str(tmp_path / "bad.extxyz")
        assert line["reason"].startswith(EXPECTED_FIELDS[line["index"]] + ":")
    assert "truncated" in lines[-1]["reason"]
    assert manifest["n_rejected"] == 7 and manifest["n_structures"] == 2
    assert sorted(a.info["index"] for a in iter_atoms(tmp_path / "out")) == [0, 5]


EDGE_FRAMES = (
    "3\n"
    'Lattice="4 0 0 0.5 4 0 0 0.25 4" Properties=species:S:1:pos:R:3:forces:R:3:charge:R:1:REF_magmoms:R:1'
    ':tag:I:1:fixed:L:1 energy=-3.5 free_energy=-3.25 stress="1 2 3 4 5 6 7 8 9" REF_stress="1 2 3 4 5 6 7 8'
    ' 9" task=crystal-pbe spin=3 charge=-1 missing=nan flags="T F T" blob="_JSON [1, 2]" note="a \\"b\\""'
    ' pbc="T T F"\n'
    "h 0.0 0.0 0.0 0.1 0.2 0.3 0.5 1.5 7 T\n"
    "Fe 1.0 1.5 2.0 -0.1 -0.2 -0.3 -0.5 -1.5 8 F\n"
    "O 2.0 2.5 3.0 1e-3 2.5e-7 -0.0 0.0 0.0 9 T\n"
    "2\n"
    "a plain comment\n"
    "C 0 0 0\n"
    "O 0 0 1.128\n"
    "2\n"
    "Properties=species:S:1:pos:R:3:move_mask:L:1 REF_energy=inf\n"
    "C 0 0 0 T\n"
    "O 0 0 1.128 F\n"
)


def assert_identical(got: Atoms, expected: Atoms) -> None:
    for name in ("numbers", "positions", "cell", "pbc"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    results = [a.calc.results if a.calc else {} for a in (got, expected)]
    for mine, theirs in ((got.info, expected.info), (got.arrays, expected.arrays), results):
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            assert np.asarray(value).dtype.kind == np.asarray(theirs[key]).dtype.kind, key
            np.testing.assert_array_equal(value, theirs[key], err_msg=key)  # exact; NaN equals NaN


def test_extxyz_reader_gives_ases_atoms(tmp_path):
    """With libextxyz or without, the reader's Atoms are ASE's: sample files and edge cases (calculator keys,
    flat 9-vectors, nan, bool lists, JSON; a plain comment and move_mask, which are left to ASE)."""
    if importlib.util.find_spec("extxyz") is not None:
        assert extxyz_reader._fastxyz is not None
    path = tmp_path / "edge.extxyz"
    path.write_text(EDGE_FRAMES)
    for source in [*SAMPLE_FILES, path]:
        expected = read_frames(source)
        got = [atoms for _, atoms in read_records(source)]
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert_identical(mine, theirs)
    assert len(got[2].constraints) == 1


@pytest.mark.parametrize("gzip_file", ["installed", "standard library"])
def test_chunks_start_at_byte_offsets(tmp_path, monkeypatch, gzip_file):
    """A chunk seeks to the offset the counting pass recorded and reads exactly its records, in gzip and
    plain files, with blank lines between frames, and a malformed frame keeps its index; gzip through
    python-isal where installed and through the standard library where it is not."""
    if gzip_file == "standard library":
        monkeypatch.setattr(extxyz_reader, "GzipFile", gzip.GzipFile)
    text = (SAMPLE / "molecules_gfn2.extxyz.gz").read_bytes()
    plain = tmp_path / "molecules.extxyz"
    plain.write_bytes(gzip.decompress(text).replace(b"\n2\n", b"\n\n2\n", 3))
    bad = tmp_path / "bad.extxyz"
    bad.write_text(BAD_FILE)
    for path in (SAMPLE / "molecules_gfn2.extxyz.gz", plain, bad):
        everything = [
            (i, a if isinstance(a, Exception) else a.get_chemical_formula()) for i, a in read_records(path)
        ]
        n, marks = extxyz_reader.offsets(path, 7)
        assert n == count_records(path) == len(everything) and len(marks) == -(-n // 7)
        chunked = []
        for start, offset in zip(range(0, n, 7), marks, strict=True):
            for i, a in read_records(path, start=start, stop=start + 7, offset=offset):
                chunked.append((i, a if isinstance(a, Exception) else a.get_chemical_formula()))
        assert [i for i, _ in chunked] == [i for i, _ in everything]
        for (_, mine), (_, theirs) in zip(chunked, everything, strict=True):
            assert type(mine) is type(theirs) and str(mine) == str(theirs)
    chunks = plan_chunks(DataConfig(sources=[SAMPLE / "molecules_gfn2.extxyz.gz"], shard_size=60))
    assert chunks[0].offset == 0 and all(a.offset < b.offset for a, b in itertools.pairwise(chunks))


def test_strict_names_file_record_and_field(tmp_path, capsys):
    path = tmp_path / "bad.extxyz"
    path.write_text(BAD_FILE)
    with pytest.raises(StrictModeError, match=r"bad\.extxyz, record 1: rejected on energy"):
        prepare(DataConfig(sources=[path], strict=True), tmp_path / "out")
    assert cli([str(path), "--out", str(tmp_path / "cli"), "--strict"]) == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "record 1" in message and "energy" in message and "bad.extxyz" in message


def test_cli_writes_contract_outputs(tmp_path):
    path = tmp_path / "mixed.extxyz"
    path.write_text(BAD_FILE)
    assert cli([str(path), "--out", str(tmp_path / "out"), "--val-fraction", "0"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["n_structures"], manifest["n_rejected"]) == (2, 7)
    assert len((tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()) == 7


def edge_set(i, j, shifts) -> set:
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts, strict=True)}


def test_neighbour_graphs_match_ase(sample_dir):
    dataset = GraphDataset(sample_dir, split=None)
    kinds = set()
    for k in range(0, len(dataset), 37):
        graph = dataset[k]
        atoms = Atoms(numbers=graph.atomic_numbers, positions=graph.positions, cell=graph.cell, pbc=graph.pbc)
        expected = edge_set(*neighbor_list("ijS", atoms, 6.0))
        assert edge_set(graph.edge_index[0], graph.edge_index[1], graph.edge_shift) == expected
        kinds.add(bool(graph.pbc.all()))
    assert kinds == {True, False}  # periodic crystals and open molecules both checked


def test_partly_periodic_graphs_match_ase():
    """Slabs and wires: periodic images only along periodic directions, with a real or a zero cell vector
    in the open ones, and an open direction much longer than the cutoff."""
    from ase.build import bulk, fcc111

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)  # pbc T T F, cell with a vacuum gap
    wire = bulk("Al", "fcc", a=4.05, cubic=True).repeat((3, 1, 1))
    wire.pbc = (True, False, False)
    wire.cell[1:] = 0.0  # open directions without cell vectors
    rng = np.random.default_rng(0)
    wire.positions += rng.normal(0, 0.05, wire.positions.shape)
    long_open = slab.copy()
    long_open.cell[2] = [0.0, 0.0, 80.0]
    for atoms in (slab, wire, long_open):
        graph = neighbor_graph(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
        reference = atoms.copy()
        if not reference.pbc.all():  # ASE needs a non-singular cell: give open directions a long vector
            for axis in np.flatnonzero(~reference.pbc):
                if not reference.cell[axis].any():
                    reference.cell[axis] = np.eye(3)[axis] * 100.0
        expected = neighbor_list("ijSd", reference, 6.0)
        assert edge_set(*graph.edge_index, graph.edge_shift) == edge_set(*expected[:3])
        assert not graph.edge_shift[:, ~atoms.pbc].any()
        assert np.allclose(np.sort(graph.distance), np.sort(expected[3]))


def test_sparse_and_dense_structures_take_both_searches_and_match_ase():
    """pymatgen's grid search for dense structures, vesin's for sparse ones (a dense grid over 2,000 Å
    would take seconds): both give the reference edges, shifts and distances."""
    from matris.graph import FREE_BINS, MAX_BINS_PER_ATOM, _grid_bins

    rng = np.random.default_rng(1)
    sparse_open = Atoms("H300", positions=rng.uniform(-1000.0, 1000.0, (300, 3)))
    sparse_open.positions[1] = sparse_open.positions[0] + [0.0, 0.0, 0.9]  # at least one edge
    sparse_periodic = Atoms("Ar8", positions=rng.uniform(0.0, 150.0, (8, 3)), cell=[150.0] * 3, pbc=True)
    dense_periodic = Atoms("Cu4", scaled_positions=rng.uniform(0.0, 1.0, (4, 3)), cell=[3.6] * 3, pbc=True)
    dense_open = Atoms("C60", positions=rng.uniform(0.0, 8.0, (60, 3)))
    for atoms, dense in (
        (sparse_open, False),
        (sparse_periodic, False),
        (dense_periodic, True),
        (dense_open, True),
    ):
        bins = _grid_bins(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
        assert (bins <= MAX_BINS_PER_ATOM * len(atoms) + FREE_BINS) == dense
        graph = neighbor_graph(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
        if atoms.pbc.any():
            expected = neighbor_list("ijSd", atoms, 6.0)
        else:  # every pair, directly: ASE's bins over 2,000 Å would not fit in memory
            d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
            i, j = np.nonzero((d < 6.0) & ~np.eye(len(atoms), dtype=bool))
            expected = (i, j, np.zeros((len(i), 3)), d[i, j])
        assert edge_set(*graph.edge_index, graph.edge_shift) == edge_set(*expected[:3])
        assert np.allclose(np.sort(graph.distance), np.sort(expected[3]))
        assert np.all(np.diff(graph.edge_index[0]) >= 0)  # sorted by centre


def test_chunks_reused_when_verified_and_redone_when_corrupt(tmp_path):
    config = DataConfig(sources=[SAMPLE / "molecules_gfn2.extxyz.gz"], shard_size=60)
    chunks = plan_chunks(config)
    assert [(c.start, c.stop) for c in chunks] == [(s, s + 60) for s in range(0, 1500, 60)]
    out = tmp_path / "out"
    out.mkdir()
    first = [write_chunk(c, config, out) for c in chunks]
    finalize(out, config, first)
    assert is_complete(out)
    victim = out / first[1].shards[0]["file"]
    with open(victim, "r+b") as fh:
        fh.seek(4096)
        fh.write(b"corrupted")
    assert problem(out) == f"shard {victim} does not match its sha256 in {out / 'manifest.json'}"
    mtimes = {e["file"]: os.stat(out / e["file"]).st_mtime_ns for r in first for e in r.shards}
    second = [write_chunk(c, config, out) for c in chunks]
    assert [r.reused for r in second] == [k != 1 for k in range(len(chunks))]
    for r in second:
        for e in r.shards:
            changed = os.stat(out / e["file"]).st_mtime_ns != mtimes[e["file"]]
            assert changed == (r is second[1])
    assert finalize(out, config, second) == finalize(out, config, first)
    assert is_complete(out)
    manifest = bytearray((out / "manifest.json").read_bytes())
    manifest[len(manifest) // 2] ^= 0xFF  # no longer UTF-8 there: an unreadable manifest, named
    (out / "manifest.json").write_bytes(bytes(manifest))
    assert "manifest.json is unreadable" in problem(out)
    finalize(out, config, second)
    redo = DataConfig(sources=config.sources, shard_size=60, cutoff=5.0)
    assert not any(write_chunk(c, redo, out).reused for c in chunks[:1])


def test_killed_sharding_resumes_without_redoing_verified_shards(tmp_path):
    """SIGKILL ``python -m data_prep`` after a few chunks; the rerun keeps every shard written before the
    kill (same bytes, same mtime), redoes the rest and ends with the manifest of an uninterrupted run."""
    source = tmp_path / "many.extxyz"
    frames = extxyz_reader.frames(SAMPLE / "crystals_pbe.extxyz.gz")
    first = [b"".join(lines) for _, lines in itertools.islice(frames, 240)]
    source.write_bytes(b"".join(first) * 6)
    command = [sys.executable, "-m", "data_prep", str(source), "--shard-size", "40"]
    out = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "parts").glob("*.json"))) < 3:
        assert process.poll() is None, "data_prep finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    before = {f.name: f.stat().st_mtime_ns for f in (out / "shards").glob("*.h5")}
    done = {f.name.removesuffix(".json") for f in (out / "parts").glob("*.json")}
    assert 3 <= len(done) < 36
    subprocess.run([*command, "--out", str(out)], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    after = {f.name: f.stat().st_mtime_ns for f in (out / "shards").glob("*.h5")}
    kept = [name for name in before if name.rsplit("-", 2)[0] in done]
    assert kept and all(after[name] == before[name] for name in kept)
    assert not list(out.rglob("*.tmp"))
    subprocess.run(
        [*command, "--out", str(tmp_path / "clean")], cwd=ROOT, check=True, stderr=subprocess.DEVNULL
    )
    resumed, clean = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "clean"))
    assert (
        resumed["shards"] == clean["shards"] and resumed["n_structures"] == clean["n_structures"] == 6 * 240
    )
    assert is_complete(out)


def test_dataset_at_a_shorter_cutoff_drops_the_longer_edges_from_graphs_and_sizes(sample_dir):
    """A 5 Å model on the 6 Å sample: every graph keeps exactly its edges shorter than 5 Å, in order, and
    ``sizes`` counts those; atoms and triplets (4 Å) are unchanged."""
    full, short = GraphDataset(sample_dir), GraphDataset(sample_dir, cutoff=5.0)
    assert GraphDataset(sample_dir, cutoff=6.0).cutoff is None and short.cutoff == 5.0
    for i in range(0, len(full), 97):
        g, s = full[i], short[i]
        lengths = np.linalg.norm(
            g.positions[g.edge_index[1]] + g.edge_shift @ g.cell - g.positions[g.edge_index[0]], axis=1
        )
        np.testing.assert_array_equal(s.edge_index, g.edge_index[:, lengths < 5.0])
        np.testing.assert_array_equal(s.edge_shift, g.edge_shift[lengths < 5.0])
        assert short.sizes[i, 1] == s.n_edges <= g.n_edges
    assert short.sizes[:, 1].sum() < 0.7 * full.sizes[:, 1].sum()
    np.testing.assert_array_equal(short.sizes[:, [0, 2]], full.sizes[:, [0, 2]])


def test_dataset_items_collate(sample_dir):
    dataset = GraphDataset(sample_dir)
    manifest = json.loads((sample_dir / "manifest.json").read_text())
    assert len(dataset) == manifest["n_train"] == len(dataset.sizes)
    items = [dataset[i] for i in range(0, len(dataset), 25)]
    for i, item in zip(range(0, len(dataset), 25), items, strict=True):
        edge_index = torch.from_numpy(item.edge_index)
        vectors = (
            item.positions[item.edge_index[1]]
            + item.edge_shift @ item.cell
            - item.positions[item.edge_index[0]]
        )
        triplets = line_graph(edge_index, torch.from_numpy(np.linalg.norm(vectors, axis=1)), 4.0)[0]
        assert tuple(dataset.sizes[i]) == (item.n_atoms, item.n_edges, len(triplets))
    batch = collate(items)
    assert batch.num_structures == len(items)
    assert batch.num_atoms == sum(s.n_atoms for s in items)
    assert batch.has_stress is not None and batch.has_magmoms is not None
    assert set(batch.task.tolist()) <= set(range(len(manifest["tasks"])))
    stored = {(Path(a.info["source"]).name, a.info["index"]): a for a in iter_atoms(sample_dir, "train")}
    first = next(iter(stored.values()))
    assert manifest["tasks"][dataset[0].task] == first.info["task"]
    assert dataset[0].energy == pytest.approx(first.get_potential_energy())
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[5].positions, dataset[5].positions)


def test_batch_plan_deterministic_within_budget_and_resumable():
    rng = np.random.default_rng(3)
    sizes = np.stack([rng.integers(2, 60, 500), rng.integers(0, 3000, 500)], axis=1)
    sizes[7] = (500, 20000)  # larger than the budget: its own batch
    plan = BatchPlan(sizes, max_atoms=256, max_edges=12000, seed=11)
    epoch0 = plan.batches(0)
    assert epoch0 == BatchPlan(sizes, 256, 12000, seed=11).batches(0)
    assert epoch0 != plan.batches(1)
    assert sorted(i for b in epoch0 for i in b) == list(range(500))
    assert [7] in epoch0
    for b in epoch0:
        if len(b) > 1:
            assert sizes[b, 0].sum() <= 256 and sizes[b, 1].sum() <= 12000
    flat = [(e, k) for e in range(3) for k in range(plan.num_batches(e))]
    for step in (0, 1, len(epoch0) - 1, len(epoch0), len(flat) - 1):
        assert plan.locate(step) == flat[step]
    ordered = BatchPlan(sizes, 256, None, seed=0, shuffle=False).batches(4)
    assert [i for b in ordered for i in b] == list(range(500))
    with_triplets = np.concatenate([sizes, rng.integers(0, 40000, (500, 1))], axis=1)
    capped = BatchPlan(with_triplets, 256, 12000, seed=11, max_triplets=60000).batches(0)
    assert len(capped) > len(epoch0) and sorted(i for b in capped for i in b) == list(range(500))
    assert all(with_triplets[b, 2].sum() <= 60000 for b in capped if len(b) > 1)
    with pytest.raises(ValueError, match="triplet column"):
        BatchPlan(sizes, 256, max_triplets=1000)


def test_split_for_ranks_partitions_exactly():
    rng = np.random.default_rng(5)
    sizes = np.stack([rng.integers(1, 50, 64), rng.integers(0, 5000, 64)], axis=1)
    indices = rng.permutation(64)[:40].tolist()
    for n_parts in (1, 2, 3, 8):
        parts = split_for_ranks(indices, sizes, n_parts)
        assert len(parts) == n_parts and all(parts)
        assert sorted(i for p in parts for i in p) == sorted(indices)
        assert parts == split_for_ranks(indices, sizes, n_parts)
        loads = [int(sizes[p, 1].sum()) for p in parts]
        assert max(loads) - min(loads) <= sizes[indices, 1].max()
        for p in parts:
            assert p == sorted(p, key=indices.index)
    few = split_for_ranks(indices[:3], sizes, 5)
    assert sum(bool(p) for p in few) == 3


def test_config_validation():
    with pytest.raises(ValidationError, match="val_fraction"):
        DataConfig(sources=["a.xyz"], val_fraction=1.0)
    with pytest.raises(ValidationError, match="three_body_cutoff"):
        DataConfig(sources=["a.xyz"], cutoff=3.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataConfig(sources=["a.xyz"], cutof=5.0)
    with pytest.raises(ValidationError, match="shard_size"):
        DataConfig(sources=["a.xyz"], shard_size=0)


def test_split_independent_of_chunking(sample_dir, tmp_path):
    source = SAMPLE / "crystals_pbe.extxyz.gz"
    prepare(DataConfig(sources=[source], shard_size=700), tmp_path / "small")
    assert len(plan_chunks(DataConfig(sources=[source], shard_size=700))) == 3
    chunked = {a.info["index"] for a in iter_atoms(tmp_path / "small", "val")}
    whole = {i for (name, i) in by_record(sample_dir, "val") if name == source.name}
    assert chunked == whole and chunked
    ranged = [i for i, _ in read_records(source, start=70, stop=75)]
    assert ranged == [70, 71, 72, 73, 74]


def test_forked_dataloader_workers(sample_dir):
    import torch.utils.data

    dataset = GraphDataset(sample_dir, split="val")
    dataset[0]  # opens a handle in the parent; workers must open their own
    plan = BatchPlan(dataset.sizes, max_atoms=200, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=plan.batches(0),
        collate_fn=collate,
        num_workers=2,
        multiprocessing_context="fork",
    )
    batches = list(loader)
    assert sum(b.num_structures for b in batches) == len(dataset)
    assert sum(b.num_atoms for b in batches) == int(dataset.sizes[:, 0].sum())
