"""data_prep on hostile inputs: broken extxyz framing. Each case is a real file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import DataConfig, iter_atoms, prepare
from data_prep.readers import count_records, read_records
from data_prep.readers import extxyz as extxyz_reader

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
