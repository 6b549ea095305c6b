"""Self-contained model files: one ``.safetensors`` with the config, tasks and metadata in its header.

The header also carries a sha256 of everything else in the file: every other header field (format,
version, config, tasks, reference energies, user metadata) and the tensors (names, dtypes, shapes and
bytes in name order). It is checked at load, so a truncated or altered file, a one-byte edit of the config
included, is refused instead of silently giving wrong energies. Version 1 files hashed the tensors only
and are refused with the command that re-exports them.
Besides the config it holds the per-task per-element reference energies in readable form, so a user can
see what a file contains without loading it (``python -m janus.export --show FILE``). A model pruned to
some elements (`matris.prune`) carries an ``allowed_elements`` tensor; ``load`` turns it back into a guard
that refuses structures with other elements, because the experts those elements routed to are gone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from ase.data import chemical_symbols
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from matris.config import ModelConfig
from matris.model import MatRIS
from matris.moe import deferred_experts
from matris.prune import ALLOWED, restrict_elements

FORMAT = "matris"
VERSION = "2"
DIGEST = "sha256"
UNVERIFIABLE = {"1": "its checksum covers the tensors but not the config"}


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for a writer that needs a path, renamed over ``path`` when the block
    ends: a reader sees the old file or the new one, never a partial one. When the block fails the temp
    file is removed, and a failed write (``ENOSPC``, ``EDQUOT``, ``EIO``) raises an error naming ``path``;
    files written before stay as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically (`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (shards, checkpoints and manifests can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _digest(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the header fields but the digest itself (as sorted JSON) and of the tensors."""
    sha = hashlib.sha256()
    sha.update(json.dumps({k: v for k, v in header.items() if k != DIGEST}, sort_keys=True).encode())
    sha.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        sha.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        sha.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def save(model: MatRIS, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write weights, buffers and everything needed to rebuild ``model`` to ``path``, atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.model_dump_json(),
        "tasks": json.dumps(model.config.tasks),
        "reference_energy": json.dumps(model.reference_energy.tolist()),
        "reference_energies": json.dumps(reference_energies(model)),
        "metadata": json.dumps(metadata or {}),
    }
    header[DIGEST] = _digest(header, tensors)
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def read_header(path: str | Path) -> dict[str, str]:
    """The string metadata of a model file (config JSON, tasks, version, user metadata, digest)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{path} is not a safetensors model file (bad header length)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors model file (unreadable header)") from e
    return header.get("__metadata__") or {}


def verified(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a model file written by ``save`` whose digest matches; raises ValueError
    naming the file and what is wrong (foreign, older version, incompatible, corrupted)."""
    path = Path(path)
    meta = read_header(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a MatRIS model file (format {meta.get('format')!r})")
    version = meta.get("version")
    if version in UNVERIFIABLE:
        raise ValueError(
            f"{path} was written by an older version of matris (model file version {version!r}: "
            f"{UNVERIFIABLE[version]}); re-export it with `python -m janus.export --checkpoint "
            f"RUN/train/checkpoints --out {path}`"
        )
    if version != VERSION:
        raise ValueError(f"{path} has model file version {version!r}; this code reads {VERSION}")
    try:
        config = ModelConfig.model_validate_json(meta["config"])
        tensors = load_file(path)
    except (KeyError, ValidationError, SafetensorError) as e:
        raise ValueError(f"{path} is corrupted or incompatible: {e}") from e
    if _digest(meta, tensors) != meta.get(DIGEST):
        raise ValueError(f"{path} is corrupted: its {DIGEST} does not match its header fields and tensors")
    return config, tensors


def load(path: str | Path, device: str | torch.device = "cpu") -> MatRIS:
    """Rebuild a model saved by ``save``; refuses foreign, incompatible or corrupted files."""
    path = Path(path)
    config, tensors = verified(path)
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    allowed = tensors.pop(ALLOWED, None)
    with deferred_experts():  # the file's expert weights become the parameters: no second copy
        model = MatRIS(config).to(dtype)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match its own config: {e}") from e
    if allowed is not None:
        restrict_elements(model, allowed.tolist())
    return model.to(device).eval()


def reference_energies(model: MatRIS) -> dict[str, dict[str, float]]:
    """Non-zero reference energies (eV) by task and element symbol: the readable view of the buffer."""
    table = model.reference_energy.detach().cpu().double()
    return {
        task: {
            chemical_symbols[z]: float(table[row, z]) for z in torch.nonzero(table[row]).flatten().tolist()
        }
        for row, task in enumerate(model.config.tasks)
    }


def metadata(path: str | Path) -> dict[str, Any]:
    """The user metadata stored by ``save``."""
    return json.loads(read_header(path).get("metadata", "{}"))
