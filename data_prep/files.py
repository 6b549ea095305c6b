"""Atomic file writes that fail cleanly, as on a full disk."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace``: a reader sees the old file or the
    new one, never a partial one. When the write fails (``ENOSPC``, ``EDQUOT``, ``EIO``) the temp file is
    removed and the error names ``path``; files written before stay as they are."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    os.replace(tmp, path)
