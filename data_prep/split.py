"""Deterministic train/val assignment from a record's identity, independent of chunking and run order."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def split_of(source: str | Path, index: int | str, val_fraction: float) -> str:
    """``"val"`` when blake2b of ``"{file name}:{index}"`` maps below ``val_fraction``, else ``"train"``.

    Only the file name enters the hash, so moving the data to another directory keeps the split.
    """
    digest = hashlib.blake2b(f"{os.path.basename(source)}:{index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2.0**64 < val_fraction else "train"
