"""Extended XYZ, plain or gzip, read as a stream.

The file is split into frames by their atom-count lines without parsing, and the counting pass records the
byte offset where each chunk starts, so a chunk seeks there (a gzip stream is decompressed up to it, not
split into lines). Each frame is parsed on its own: a malformed or truncated frame becomes an exception for
that record only. Gzip is decompressed as a stream: ASE seeking in gzip is ~100x slower. The stream is
python-isal's ``IGzipFile`` (ISA-L's inflate) where it imports, else the standard library's ``GzipFile``:
seeking to every 250-frame chunk of data/crystals_pbe costs 0.016 ms per frame against 0.056
(``benchmarks/bench_data_prep.py``, "components"); the difference is ~6 % of a crystal's ~0.7 ms.

A frame is parsed by libextxyz's C parser when the ``extxyz`` package imports (``_fastxyz``, ~4x faster
than ASE on small cells, same ``Atoms``); a frame it cannot read, and every frame without it, goes to ASE.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import ase.io
from ase import Atoms

try:
    from isal.igzip import IGzipFile as GzipFile
except ImportError:  # a platform without ISA-L wheels (pyproject asks for isal only where they exist)
    from gzip import GzipFile

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
        return io.BufferedReader(GzipFile(path, "rb"), 1 << 16)
    return open(path, "rb")


def frames(path: Path, offset: int = 0) -> Iterator[tuple[int, list[bytes] | MalformedFrame]]:
    """Byte offset (in the decompressed text) and raw lines of each frame from ``offset`` on; after an
    unreadable atom count or a truncated frame, the file ends."""
    with open_binary(path) as fh:
        if offset:
            fh.seek(offset)  # gzip: decompresses up to there without splitting lines
        position = offset
        while True:
            header = fh.readline()
            if not header:
                return
            start, position = position, position + len(header)
            if not header.strip():
                continue
            try:
                n_atoms = int(header.split()[0])
            except ValueError:
                text = header.decode(errors="replace").strip()[:60]
                yield start, MalformedFrame(f"atom-count line is not an integer: {text!r}")
                return
            body = list(islice(fh, n_atoms + 1))
            position += sum(map(len, body))
            if len(body) < n_atoms + 1:
                yield (
                    start,
                    MalformedFrame(
                        f"truncated frame: expected {n_atoms} atom lines, found {max(len(body) - 1, 0)}"
                    ),
                )
                return
            yield start, [header, *body]


def count(path: Path) -> int:
    return sum(1 for _ in frames(path))


def offsets(path: Path, every: int) -> tuple[int, list[int]]:
    """The number of frames and the byte offsets of frames 0, every, 2·every, …: a chunk starts reading
    there instead of splitting every earlier frame."""
    marks, n = [], 0
    for n, (offset, _) in enumerate(frames(path), start=1):
        if (n - 1) % every == 0:
            marks.append(offset)
    return n, marks


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


def read(
    path: Path, start: int = 0, stop: int | None = None, offset: int | None = None
) -> Iterator[tuple[int, Atoms | Exception]]:
    """Frames ``start <= index < stop``; ``offset``, from `offsets`, is where frame ``start`` begins."""
    first = 0 if offset is None else start
    for index, (_, frame) in enumerate(frames(path, offset or 0), start=first):
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
