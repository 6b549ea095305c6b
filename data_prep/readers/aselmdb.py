"""fairchem's ``*.aselmdb`` (OMat24, OMol25) through the ``ase-db-backends`` package.

Rows are fetched by position in the id list, so a chunk reads only its own rows. The package registers
the ``aselmdb`` type with ``ase.db``; it is an optional dependency (``pip install ase-db-backends``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ase.db
from ase import Atoms

from data_prep.readers.asedb import row_atoms


def connect(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"no such aselmdb file: {path}")
    try:
        import ase_db_backends  # noqa: F401  (registers the aselmdb type)
    except ImportError as error:
        raise ImportError(
            "reading .aselmdb files needs the ase-db-backends package: pip install ase-db-backends"
        ) from error
    return ase.db.connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)


def count(path: Path) -> int:
    return connect(path).count()


def read(
    path: Path, start: int = 0, stop: int | None = None, offset: int | None = None
) -> Iterator[tuple[int, Atoms | Exception]]:
    db = connect(path)
    ids = db.ids[start:stop]
    for row_id in ids:
        try:
            yield row_id, row_atoms(db.get(id=row_id))
        except Exception as error:  # a corrupt row is quarantined
            yield row_id, ValueError(f"{type(error).__name__}: {error}")
