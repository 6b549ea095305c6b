"""ASE database (SQLite, or anything ``ase.db.connect`` knows by extension), rows in id order.

Key-value pairs are copied into ``atoms.info`` so the task, charge and spin keys are found there; the
calculator results (energy, forces, stress, magmoms) stay on ``atoms.calc``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ase.db
from ase import Atoms


def row_atoms(row) -> Atoms:
    atoms = row.toatoms()
    stored = vars(row)  # raw values: row.key_value_pairs reads "charge" through AtomsRow's charge property
    atoms.info.update({key: stored.get(key, value) for key, value in row.key_value_pairs.items()})
    for key, value in (row.get("data") or {}).items():
        atoms.info.setdefault(key, value)
    return atoms


def rows(db, start: int, stop: int | None) -> Iterator[tuple[int, Atoms | Exception]]:
    limit = None if stop is None else max(stop - start, 0)
    if limit == 0:
        return
    for row in db.select(sort="id", offset=start, limit=limit):
        try:
            yield row.id, row_atoms(row)
        except Exception as error:  # a row that cannot become Atoms is quarantined
            yield row.id, ValueError(f"{type(error).__name__}: {error}")


def connect(path: Path):
    if not path.is_file():  # connect() would silently create an empty database
        raise FileNotFoundError(f"no such ASE database: {path}")
    return ase.db.connect(str(path), type="db", use_lock_file=False)


def count(path: Path) -> int:
    return connect(path).count()


def read(
    path: Path, start: int = 0, stop: int | None = None, offset: int | None = None
) -> Iterator[tuple[int, Atoms | Exception]]:
    yield from rows(connect(path), start, stop)
