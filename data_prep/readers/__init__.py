"""Readers: one module per input format, each with the same two functions.

``count(path) -> int`` gives the number of records (for chunk planning) and ``read(path, start, stop,
offset)`` yields ``(record_id, atoms_or_exception)`` for records ``start <= position < stop``. A stream
format (extxyz) also has ``offsets(path, every)``, the byte offsets where chunks start, which ``read`` takes
as ``offset``; random-access formats ignore it. A malformed record
comes back as an exception in place of the atoms, so one bad record is quarantined instead of ending the
run. Labels stay where the format puts them (``info``/``arrays`` or calculator results); ``validate``
finds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from ase import Atoms

from data_prep.readers import asedb, aselmdb, extxyz, mptrj

Record = tuple[int | str, Atoms | Exception]

READERS: dict[str, ModuleType] = {"extxyz": extxyz, "asedb": asedb, "mptrj": mptrj, "aselmdb": aselmdb}
SUFFIXES = {
    ".extxyz": "extxyz",
    ".xyz": "extxyz",
    ".db": "asedb",
    ".json": "mptrj",
    ".aselmdb": "aselmdb",
    ".lmdb": "aselmdb",
}


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The explicit format, or the one named by the file's extension (``.gz`` is looked through)."""
    if fmt != "auto":
        if fmt not in READERS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
        return fmt
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in SUFFIXES:
        return SUFFIXES[suffixes[-1]]
    raise ValueError(f"cannot tell the format of {path} from its extension; pass --format")


def check_source(path: Path) -> None:
    """Raise, naming ``path``, unless it is an existing file. A directory is an error rather than read as
    the files in it: which of them are data, and in which format, is the caller's to say."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"input {path} is a directory; give the files in it (e.g. {path}/*.extxyz)")
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")


def count_records(path: Path, fmt: str = "auto") -> int:
    check_source(path)
    return READERS[detect_format(path, fmt)].count(Path(path))


def plan_records(path: Path, fmt: str, every: int) -> list[tuple[int, int, int | None]]:
    """``(start, stop, offset)`` of consecutive ranges of ``every`` records; ``offset`` is None where the
    format has no byte offsets."""
    check_source(path)
    reader = READERS[detect_format(path, fmt)]
    if hasattr(reader, "offsets"):
        n, marks = reader.offsets(Path(path), every)
    else:
        n = reader.count(Path(path))
        marks = [None] * len(range(0, n, every))
    return [
        (start, min(start + every, n), mark) for start, mark in zip(range(0, n, every), marks, strict=True)
    ]


def read_records(
    path: Path, fmt: str = "auto", start: int = 0, stop: int | None = None, offset: int | None = None
) -> Iterator[Record]:
    return READERS[detect_format(path, fmt)].read(Path(path), start, stop, offset)
