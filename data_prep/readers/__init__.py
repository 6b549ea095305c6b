"""Readers: one module per input format, each with the same two functions.

``count(path) -> int`` gives the number of records (for chunk planning) and ``read(path, start, stop)``
yields ``(record_id, atoms_or_exception)`` for records ``start <= position < stop``. A malformed record
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


def count_records(path: Path, fmt: str = "auto") -> int:
    return READERS[detect_format(path, fmt)].count(Path(path))


def read_records(path: Path, fmt: str = "auto", start: int = 0, stop: int | None = None) -> Iterator[Record]:
    return READERS[detect_format(path, fmt)].read(Path(path), start, stop)
