"""Extended XYZ, plain or gzip, read as a stream.

The file is split into frames by their atom-count lines without parsing, so skipping to a chunk's start is
cheap and each frame is parsed on its own: a malformed or truncated frame becomes an exception for that
record only. Gzip is decompressed as a stream (``gzip.open``) because ASE seeking in gzip is ~100x slower.

A frame is parsed by libextxyz's C parser when the ``extxyz`` package imports (``_fastxyz``, ~4x faster
than ASE on small cells, same ``Atoms``); a frame it cannot read, and every frame without it, goes to ASE.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import ase.io
from ase import Atoms

try:
    from data_prep.readers import _fastxyz
except (ImportError, OSError, AttributeError):  # no libextxyz wheel, or a libc without fmemopen
    _fastxyz = None


class MalformedFrame(ValueError):
    """A frame whose text cannot be cut out of the file (bad atom count or truncated)."""


def open_binary(path: Path) -> BinaryIO:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":  # GzipFile.readline is Python code; a BufferedReader over it splits in C
        return io.BufferedReader(gzip.GzipFile(path, "rb"), 1 << 16)
    return open(path, "rb")


def frames(path: Path) -> Iterator[list[bytes] | MalformedFrame]:
    """Raw lines of each frame; after an unreadable atom count or a truncated frame, the file ends."""
    with open_binary(path) as fh:
        while True:
            header = fh.readline()
            if not header:
                return
            if not header.strip():
                continue
            try:
                n_atoms = int(header.split()[0])
            except ValueError:
                text = header.decode(errors="replace").strip()[:60]
                yield MalformedFrame(f"atom-count line is not an integer: {text!r}")
                return
            lines = [header, *islice(fh, n_atoms + 1)]
            if len(lines) < n_atoms + 2:
                yield MalformedFrame(
                    f"truncated frame: expected {n_atoms} atom lines, found {max(len(lines) - 2, 0)}"
                )
                return
            yield lines


def count(path: Path) -> int:
    return sum(1 for _ in frames(path))


def parse(lines: list[bytes]) -> Atoms:
    data = b"".join(lines)
    if _fastxyz is not None:
        try:
            return _fastxyz.parse(data)
        except Exception:  # outside libextxyz's grammar: ASE reads the frame or says why it cannot
            pass
    atoms = ase.io.read(io.StringIO(data.decode()), format="extxyz")
    if not isinstance(atoms, Atoms):
        raise MalformedFrame("frame did not parse to one structure")
    return atoms


def read(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Atoms | Exception]]:
    for index, frame in enumerate(frames(path)):
        if stop is not None and index >= stop:
            return
        if index < start:
            continue
        if isinstance(frame, Exception):
            yield index, frame
            continue
        try:
            yield index, parse(frame)
        except Exception as error:  # any parse failure is this record's fault, not the run's
            yield index, MalformedFrame(f"{type(error).__name__}: {error}")
