"""data_prep on hostile inputs: broken extxyz framing, repeated and unreadable inputs, empty datasets, a
full disk and physically absurd structures. Each case is a real file; the full disk is a real tmpfs where
user namespaces allow mounting one, and a failing write otherwise."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from data_prep import (
    DataConfig,
    DataWarning,
    EmptyDatasetError,
    iter_atoms,
    plan_chunks,
    prepare,
    write_chunk,
)
from data_prep.__main__ import main as cli
from data_prep.readers import count_records, read_records
from data_prep.readers import extxyz as extxyz_reader
from matris.io import file_sha256

ROOT = Path(__file__).resolve().parents[1]
MOL = 'Properties=species:S:1:pos:R:3:REF_forces:R:3 task=mol REF_energy={e} pbc="F F F"'
WATER = ["O 0 0 0 0 0 0", "H 0 0 0.96 0 0 0", "H 0.93 0 -0.24 0 0 0"]
HYDROGEN = ["H 0 0 0 0 0 0", "H 0 0 0.74 0 0 0"]


def frame(atoms: list[str], energy: float, count: int | None = None, comment: str = MOL) -> str:
    """One extxyz frame; ``count`` overrides the atom-count line."""
    n = len(atoms) if count is None else count
    return f"{n}\n{comment.format(e=energy)}\n" + "".join(line + "\n" for line in atoms)


def good(k: int) -> str:
    """A valid molecule whose energy, -k - 1, tells which record it is."""
    return frame(WATER if k % 2 else HYDROGEN, -k - 1.0)


def quarantine(out: Path) -> dict:
    lines = (out / "quarantine.jsonl").read_text().splitlines()
    return {line["index"]: line for line in map(json.loads, lines)}


def accepted(out: Path) -> dict[int, float]:
    return {a.info["index"]: a.get_potential_energy() for a in iter_atoms(out)}


def compact(text: str) -> str:
    """``text`` without whitespace: the console wraps long paths."""
    return "".join(text.split())


def ours(caught) -> list[str]:
    """The messages of data_prep's own warnings among those ``pytest.warns`` recorded."""
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m data_prep`` in its own process: a crash in C code fails the test instead of pytest."""
    command = [sys.executable, "-m", "data_prep", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_zero_atom_frame_is_quarantined_and_the_rest_read(tmp_path):
    path = tmp_path / "zero.extxyz"
    path.write_text(good(0) + frame([], -9.0) + good(2) + frame([], -9.0, comment="") + good(4))
    out = tmp_path / "out"
    result = run_cli(str(path), "--out", str(out), "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    rejected = quarantine(out)
    assert sorted(rejected) == [1, 3]
    for line in rejected.values():
        assert line["source"] == str(path)
        assert line["field"] == "numbers" and "no atoms" in line["reason"]
    assert accepted(out) == {0: -1.0, 2: -3.0, 4: -5.0}


FRAMING_CASES = {
    "count too small": (
        good(0) + frame(WATER, -2.0, count=2) + good(2) + good(3),
        {1: "atom count 2 is too small"},
        {0: -1.0, 2: -3.0, 3: -4.0},
    ),
    "count too large": (
        good(0) + frame(HYDROGEN, -2.0, count=4) + good(2) + good(3) + good(4),
        {1: "atom count 4 is too large"},
        {0: -1.0, 2: -3.0, 3: -4.0, 4: -5.0},
    ),
    "count too large, past the end of the file": (
        good(0) + frame(HYDROGEN, -2.0, count=50) + good(2) + good(3),
        {1: "atom count 50 is too large"},
        {0: -1.0, 2: -3.0, 3: -4.0},
    ),
    "count too large by the blank line after it": (
        good(0) + frame(HYDROGEN, -2.0, count=3) + "\n" + good(2) + good(3),
        {1: "atom count 3 is too large: line 5 of the frame is blank"},
        {0: -1.0, 2: -3.0, 3: -4.0},
    ),
    "a stray line between frames": (
        good(0) + "garbage between frames\n" + good(1),
        {1: "expected an atom-count line"},
        {0: -1.0, 2: -2.0},
    ),
    "two bad frames in a row": (
        good(0) + frame(WATER, -2.0, count=1) + frame(HYDROGEN, -3.0, count=7) + good(3),
        {1: "atom count 1 is too small", 2: "atom count 7 is too large"},
        {0: -1.0, 3: -4.0},
    ),
    "truncated last frame": (
        good(0) + good(1) + frame(WATER[:2], -3.0, count=3),
        {2: "truncated"},
        {0: -1.0, 1: -2.0},
    ),
}


@pytest.mark.parametrize("case", list(FRAMING_CASES))
def test_wrong_atom_counts_quarantine_the_frame_and_read_on(tmp_path, case):
    """A count line that disagrees with the frame's atom lines rejects that record, names it, and the reader
    resynchronises at the next count line: no record after it is lost and none is read truncated."""
    text, reasons, energies = FRAMING_CASES[case]
    path = tmp_path / "framing.extxyz"
    path.write_text(text)
    out = tmp_path / "out"
    prepare(DataConfig(sources=[path], val_fraction=0.0), out)
    rejected = quarantine(out)
    assert sorted(rejected) == sorted(reasons)
    for index, reason in reasons.items():
        assert rejected[index]["source"] == str(path) and rejected[index]["field"] == "record"
        assert reason in rejected[index]["reason"]
    assert accepted(out) == energies


def described(record: tuple) -> tuple[int, str]:
    index, atoms = record
    return index, str(atoms) if isinstance(atoms, Exception) else f"{len(atoms)} {atoms.info}"


def test_resynchronised_frames_chunk_like_the_whole_file(tmp_path):
    """Chunks start at the offsets of the counting pass, so they must frame a broken file exactly as a
    reading from its start does: same indices, same records, same errors."""
    path = tmp_path / "broken.extxyz"
    path.write_text(
        good(0)
        + frame(WATER, -2.0, count=2)
        + "\n\n"
        + good(2)
        + frame(HYDROGEN, -4.0, count=5)
        + good(4)
        + "stray\n"
        + good(5)
        + frame([], -9.0)
        + good(7)
        + frame(HYDROGEN, -9.0, count=40)
        + good(9)
        + good(10)
    )
    whole = [described(record) for record in read_records(path)]
    assert len(whole) == count_records(path) == 12
    assert [i for i, a in whole if "REF_energy" not in a] == [1, 3, 5, 9]
    for every in (1, 2, 3, 5):
        n, marks = extxyz_reader.offsets(path, every)
        chunked = []
        for start, offset in zip(range(0, n, every), marks, strict=True):
            for i, a in read_records(path, start=start, stop=start + every, offset=offset):
                chunked.append(described((i, a)))
        assert chunked == whole


def test_one_file_under_two_spellings_is_read_once(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    path = folder / "good.extxyz"
    path.write_text(good(0) + good(1) + good(2))
    (tmp_path / "link.extxyz").symlink_to(path)
    spellings = [path, folder / ".." / "x" / "good.extxyz", tmp_path / "link.extxyz", path]
    with pytest.warns(DataWarning) as caught:
        config = DataConfig(sources=spellings, val_fraction=0.0)
    assert config.sources == [path]
    messages = ours(caught)
    assert len(messages) == 3
    for spelling, message in zip(spellings[1:], messages, strict=True):
        assert str(spelling) in message and str(path) in message
    manifest = prepare(config, tmp_path / "out")
    assert manifest["sources"] == [str(path)]
    assert manifest["n_structures"] == 3 and len(manifest["shards"]) == 1
    with warnings.catch_warnings():  # the deduplicated config validates again (a Parsl worker) silently
        warnings.simplefilter("error")
        assert DataConfig.model_validate(config.model_dump(mode="json")) == config


@pytest.mark.parametrize("name", ["folder", "folder.extxyz"])
def test_directory_input_is_a_clear_error(tmp_path, capsys, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "a.extxyz").write_text(good(0))
    with pytest.raises(IsADirectoryError, match=re.escape(f"{folder} is a directory; give the files in it")):
        plan_chunks(DataConfig(sources=[folder]))
    assert cli([str(folder), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert compact(f"{folder} is a directory; give the files in it") in compact(err)
    assert "Traceback" not in err


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.extxyz"
    with pytest.raises(FileNotFoundError, match=re.escape(f"input file not found: {missing}")):
        plan_chunks(DataConfig(sources=[missing]))
    assert cli([str(missing), "--out", str(tmp_path / "out")]) == 1
    assert compact(f"input file not found: {missing}") in compact(capsys.readouterr().err)


def test_empty_and_all_rejected_inputs_warn(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    rejected = tmp_path / "rejected.extxyz"
    rejected.write_text(frame(HYDROGEN, float("nan")) + frame([], -1.0))
    fine = tmp_path / "fine.extxyz"
    fine.write_text(good(0) + good(1))
    with pytest.warns(DataWarning) as caught:
        manifest = prepare(DataConfig(sources=[empty, rejected, fine], val_fraction=0.0), tmp_path / "out")
    messages = ours(caught)
    assert len(messages) == 2
    assert str(empty) in messages[0] and "no records" in messages[0]
    assert str(rejected) in messages[1] and "all 2 records were rejected" in messages[1]
    assert manifest["warnings"] == messages
    assert manifest["n_structures"] == 2


def test_no_training_structures_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("\n\n")
    rejected = tmp_path / "rejected.extxyz"
    rejected.write_text(frame(HYDROGEN, float("nan")))
    out = tmp_path / "out"
    with pytest.warns(DataWarning), pytest.raises(EmptyDatasetError) as caught:
        prepare(DataConfig(sources=[empty, rejected]), out)
    message = str(caught.value)
    assert str(empty) in message and str(rejected) in message
    assert str(out / "quarantine.jsonl") in message
    assert (out / "quarantine.jsonl").exists() and not (out / "manifest.json").exists()
    assert cli([str(empty), str(rejected), "--out", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err
    assert compact(f"warning: {empty}: no records") in compact(err)
    assert compact(f"warning: {rejected}: its one record was rejected") in compact(err)
    assert "no training structures" in " ".join(err.split()) and "Traceback" not in err


def test_all_structures_held_out_is_an_error(tmp_path):
    path = tmp_path / "one.extxyz"
    path.write_text(good(0))
    with pytest.raises(EmptyDatasetError, match="validation split"):
        prepare(DataConfig(sources=[path], val_fraction=0.999), tmp_path / "out")


def molecules(n: int) -> str:
    return "".join(good(k) for k in range(n))


def shard_files(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted((out / "shards").glob("*"))}


def verified_chunks(out: Path) -> list[dict]:
    """The chunk summaries whose shards all verify (what a rerun keeps)."""
    kept = []
    for path in sorted((out / "parts").glob("*.json")):
        summary = json.loads(path.read_text())
        if all(file_sha256(out / e["file"]) == e["sha256"] for e in summary["shards"]):
            kept.append(summary)
    return kept


def test_full_disk_keeps_verified_shards_and_names_the_shard(tmp_path, monkeypatch):
    """The third chunk's shard write fails with ENOSPC half way through: the error names the shard and the
    cause, no partial shard remains, the two finished chunks are kept and a rerun reuses them."""
    path = tmp_path / "mols.extxyz"
    path.write_text(molecules(120))
    config = DataConfig(sources=[path], shard_size=40, val_fraction=0.0)
    chunks = plan_chunks(config)
    out = tmp_path / "out"
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name.endswith(".h5.tmp") and chunks[2].chunk_id in self.name:
            write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left on device") as caught:
        prepare(config, out)
    assert caught.value.errno == errno.ENOSPC
    assert f"{chunks[2].chunk_id}-train-000.h5" in str(caught.value)
    assert not list(out.rglob("*.tmp"))
    assert not list((out / "shards").glob(f"{chunks[2].chunk_id}*"))
    assert len(verified_chunks(out)) == 2
    before = shard_files(out)
    monkeypatch.undo()
    results = [write_chunk(c, config, out) for c in chunks]
    assert [r.reused for r in results] == [True, True, False]
    assert {name: sha for name, sha in shard_files(out).items() if name in before} == before


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    command = ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="no unprivileged user namespace to mount a small tmpfs in")
def test_full_disk_on_a_real_small_filesystem(tmp_path):
    """``python -m data_prep`` writing into a 192 kB tmpfs: it fails with a message naming the shard and
    ENOSPC (it used to segfault in HDF5's clean-up), and what it left (copied out before the namespace
    goes) holds no partial file; a rerun with room finishes from the kept chunks."""
    path = tmp_path / "mols.extxyz"
    path.write_text(molecules(600))
    mount, copy = tmp_path / "small", tmp_path / "left"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size=192k tmpfs {mount} || exit 99; "
        f"{sys.executable} -m data_prep {path} --out {mount}/out --shard-size 60 --val-fraction 0 "
        f"> {tmp_path}/stdout 2> {tmp_path}/stderr; echo $? > {tmp_path}/rc; cp -a {mount}/out {copy}"
    )
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    subprocess.run([*namespace, "sh", "-c", script], cwd=ROOT, check=True)
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", stderr
    assert "Nospaceleftondevice" in compact(stderr) and f"{mount}/out/shards/mols-" in compact(stderr)
    assert "Traceback" not in stderr
    assert not list(copy.rglob("*.tmp"))
    kept = verified_chunks(copy)
    assert 0 < len(kept) < 10
    before = shard_files(copy)
    config = DataConfig(sources=[path], shard_size=60, val_fraction=0.0)
    results = [write_chunk(c, config, copy) for c in plan_chunks(config)]
    assert sum(r.reused for r in results) == len(kept)
    assert sum(r.n_structures for r in results) == 600
    assert all(shard_files(copy)[name] == sha for name, sha in before.items() if name in shard_files(copy))


PERIODIC = 'Lattice="{a} 0 0 0 {a} 0 0 0 {a}" ' + MOL.replace('"F F F"', '"T T T"').replace("{e}", "{{e}}")


def test_absurd_density_and_isolated_atoms_are_quarantined(tmp_path):
    cluster = [f"Ar {x} {y} {z} 0 0 0" for x in (0, 3.8) for y in (0, 3.8) for z in (0, 3.8)]
    path = tmp_path / "sparse.extxyz"
    path.write_text(
        good(0)
        + frame(["Ar 0 0 0 0 0 0", "Ar 3.8 0 0 0 0 0"], -2.0, comment=PERIODIC.format(a=100))  # 1: 5e5 Å³
        + frame([*HYDROGEN, "O 0 0 20 0 0 0"], -3.0)  # 2: an O atom 19 Å from the H2 molecule
        + frame(["He 0 0 0 0 0 0"], -4.0)  # 3: a lone atom
        + frame([*cluster, "Ar 10 10 10 0 0 0"], -5.0, comment=PERIODIC.format(a=20))  # 4: 889 Å³/atom
        + frame(["Cu 0 0 0 0 0 0"], -6.0, comment=PERIODIC.format(a=2.5))  # 5: one atom, its images near
    )
    out = tmp_path / "out"
    prepare(DataConfig(sources=[path], val_fraction=0.0), out)
    rejected = quarantine(out)
    assert sorted(rejected) == [1, 2, 3, 4]
    assert rejected[1]["field"] == "cell"
    assert "volume per atom 5e+05 Å³ above max_volume_per_atom 1000 Å³" in rejected[1]["reason"]
    for index, atom in ((2, "atom 2 (O)"), (3, "atom 0 (He)"), (4, "atom 8 (Ar)")):
        assert rejected[index]["field"] == "positions"
        assert f"{atom} has no neighbour within the cutoff 6.0 Å" in rejected[index]["reason"]
    assert sorted(accepted(out)) == [0, 5]
    relaxed = DataConfig(
        sources=[path], val_fraction=0.0, max_volume_per_atom=None, reject_isolated_atoms=False
    )
    assert prepare(relaxed, tmp_path / "relaxed")["n_structures"] == 6


def test_density_bound_is_validated():
    with pytest.raises(ValidationError, match="max_volume_per_atom"):
        DataConfig(sources=[Path("a.extxyz")], max_volume_per_atom=0.0)
    assert np.isclose(DataConfig(sources=[Path("a.extxyz")]).max_volume_per_atom, 1000.0)
