"""Extended XYZ, plain or gzip, read as a stream.

The file is split into frames by their atom-count lines without parsing, and the counting pass records the
byte offset where each chunk starts, so a chunk seeks there (a gzip stream is decompressed up to it, not
split into lines). Each frame is parsed on its own: a malformed or truncated frame becomes an exception for
that record only, and a count line that disagrees with its frame's atom lines is caught while splitting
(`frames`), which goes on at the next count line. Gzip is decompressed as a stream: ASE seeking in gzip is
~100x slower. The stream is python-isal's ``IGzipFile`` (ISA-L's inflate) where it imports, else the
standard library's ``GzipFile``: seeking to every 250-frame chunk of data/crystals_pbe costs 0.016 ms per
frame against 0.056 (``benchmarks/bench_data_prep.py``, "components"); the difference is ~6 % of a
crystal's ~0.7 ms.

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


class _Lines:
    """A binary stream's lines, the byte position of the next one, and lines put back to be read again."""

    def __init__(self, fh: BinaryIO, position: int):
        self.fh, self.position = fh, position
        self.back: list[bytes] = []  # put-back lines, the next one last

    def readline(self) -> bytes:
        line = self.back.pop() if self.back else self.fh.readline()
        self.position += len(line)
        return line

    def take(self, n: int) -> list[bytes]:
        """Up to ``n`` lines (fewer at the end of the stream)."""
        if self.back:  # after a count line that was too large: its frame's lines are read again
            lines = [self.back.pop() for _ in range(min(n, len(self.back)))]
            lines.extend(islice(self.fh, n - len(lines)))
        else:
            lines = list(islice(self.fh, n))
        self.position += sum(map(len, lines))
        return lines

    def put_back(self, lines: list[bytes]) -> None:
        self.back.extend(reversed(lines))
        self.position -= sum(map(len, lines))

    def next_header(self) -> tuple[int, bytes]:
        """The position and text of the next non-blank line (``b""`` at the end of the stream)."""
        while True:
            start = self.position
            line = self.readline()
            if not line or line.strip():
                return start, line

    def skip_to_count(self) -> tuple[int, int, bytes]:
        """Skip lines up to the next atom-count line: their number, and that line's position and text."""
        skipped = 0
        while True:
            start, line = self.next_header()
            if not line or _atom_count(line) is not None:
                return skipped, start, line
            skipped += 1


def _atom_count(line: bytes) -> int | None:
    """The atom count of a frame's first line: the line is one non-negative integer (ASE's ``int(line)``)."""
    text = line.strip()
    return int(text) if text.isdigit() else None


def _quoted(line: bytes) -> str:
    return repr(line.decode(errors="replace").strip()[:60])


_SHORT_LINE = 32  # bytes: longer than any count line; a line this long is an atom line, not a stray one


def _stray_line(body: list[bytes]) -> int | None:
    """Where in ``body`` (comment line, atom lines) the first atom line with fewer than two fields is: a
    blank line or another frame's count line, so the count is too large. Every atom line has a species
    and a position, so only short lines need splitting."""
    if len(body) < 2 or min(map(len, islice(body, 1, None))) >= _SHORT_LINE:
        return None
    for k in range(1, len(body)):
        if len(body[k]) < _SHORT_LINE and len(body[k].split()) < 2:
            return k
    return None


def _more_atoms(body: list[bytes], line: bytes) -> bool:
    """Whether ``line``, read where the next frame's count line should be, is one more atom line of the
    frame in ``body``: not a count line, with as many fields as the frame's last atom line."""
    if len(body) < 2 or not line or _atom_count(line) is not None:
        return False
    return len(line.split()) == len(body[-1].split())


def frames(path: Path, offset: int = 0) -> Iterator[tuple[int, list[bytes] | MalformedFrame]]:
    """Byte offset (in the decompressed text) and raw lines of each frame from ``offset`` on, or the reason
    why the frame is malformed.

    A frame's count line is checked against its atom lines without parsing them: an atom line with fewer
    than two fields (a blank line or the next frame's count line) means the count is too large, and a line
    after the atom lines that is not a count line but has as many fields as the last atom line means it is
    too small. Either way the frame is malformed and the next frame starts at the next count line (for a
    count too large, among the lines already taken for the frame), so one bad count costs one record. A
    line where a count line should be is a malformed record of its own, up to the next count line. The
    framing depends only on the text from ``offset`` on, so a chunk that starts at an offset of `offsets`
    frames the file as a reading from the start does."""
    with open_binary(path) as fh:
        if offset:
            fh.seek(offset)  # gzip: decompresses up to there without splitting lines
        lines = _Lines(fh, offset)
        start, header = lines.next_header()
        while header:
            n_atoms = _atom_count(header)
            if n_atoms is None:
                skipped, next_start, next_header = lines.skip_to_count()
                yield (
                    start,
                    MalformedFrame(
                        f"expected an atom-count line, got {_quoted(header)} "
                        f"({skipped + 1} lines up to the next count line skipped)"
                    ),
                )
                start, header = next_start, next_header
                continue
            body = lines.take(n_atoms + 1)
            stray = _stray_line(body)
            if stray is not None:
                lines.put_back(body[stray:])
                what = "blank" if not body[stray].strip() else f"a count line, {_quoted(body[stray])}"
                yield (
                    start,
                    MalformedFrame(
                        f"atom count {n_atoms} is too large: line {stray + 2} of the frame is {what}, after "
                        f"{stray - 1} atom lines"
                    ),
                )
                start, header = lines.next_header()
                continue
            if len(body) < n_atoms + 1:
                found = max(len(body) - 1, 0)
                yield start, MalformedFrame(f"truncated frame: expected {n_atoms} atom lines, found {found}")
                return
            next_start, next_header = lines.next_header()
            if _more_atoms(body, next_header):
                skipped, next_start, next_header_after = lines.skip_to_count()
                yield (
                    start,
                    MalformedFrame(
                        f"atom count {n_atoms} is too small: line {n_atoms + 3} of the frame, "
                        f"{_quoted(next_header)}, is an atom line, not the next frame's count line "
                        f"({skipped + 1} lines up to the next count line skipped)"
                    ),
                )
                start, header = next_start, next_header_after
                continue
            yield start, [header, *body]
            start, header = next_start, next_header


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
