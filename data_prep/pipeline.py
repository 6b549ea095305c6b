"""Chunked preparation: plan record ranges, write each range's shards independently, then merge.

``plan_chunks`` → ``write_chunk`` (one per chunk, in any order or process; this is what a Parsl app
calls) → ``finalize``. ``prepare`` runs the three serially. A chunk's outputs are

    shards/{chunk_id}-{split}-{k}.h5        HDF5 shards (see ``data_prep.shards``)
    parts/{chunk_id}.quarantine.jsonl       its rejected records
    parts/{chunk_id}.json                   summary: settings fingerprint, shards with sha256, statistics

and a chunk whose summary matches the settings and whose shards verify is skipped on rerun. Every file is
written whole or not at all (`matris.io.write_atomic`), so a run that fails, as on a full disk, keeps
the chunks it finished and a rerun resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep import manifest
from data_prep.config import DataConfig, DataWarning
from data_prep.readers import check_source, detect_format, plan_records, read_records
from data_prep.shards import write_shard
from data_prep.split import split_of
from data_prep.validate import Record, Rejected, StrictModeError, check
from matris.io import file_sha256, write_atomic


class EmptyDatasetError(ValueError):
    """No structure was accepted for training: the inputs are empty or every record was rejected."""


@dataclass(frozen=True)
class Chunk:
    """Records ``start <= position < stop`` of one source file; ``offset`` is where record ``start``
    begins in a stream format (None: read from the file's start)."""

    source: str
    format: str
    start: int
    stop: int
    offset: int | None = None

    @property
    def chunk_id(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(self.source).name.split(".")[0])
        where = hashlib.blake2b(str(Path(self.source).resolve()).encode(), digest_size=4).hexdigest()
        return f"{stem}-{where}-{self.start:09d}"


@dataclass
class ChunkResult:
    """What a chunk wrote; ``reused`` is True when verified outputs from an earlier run were kept."""

    chunk: Chunk
    shards: list[dict]
    n_structures: int
    n_rejected: int
    stats: dict = field(repr=False)
    reused: bool = False


def plan_chunks(config: DataConfig) -> list[Chunk]:
    """Split each source into record ranges of ``shard_size``: a chunk writes at most one shard per split.
    A source that is missing or a directory is an error naming it (`data_prep.readers.check_source`)."""
    chunks = []
    for source in config.sources:
        check_source(Path(source))
        fmt = detect_format(Path(source), config.format)
        for start, stop, offset in plan_records(Path(source), fmt, config.shard_size):
            chunks.append(Chunk(str(source), fmt, start, stop, offset))
    return chunks


PLAN_FILE = "plan.json"  # the planned chunk ids, so that progress can be read while chunks run


@dataclass
class ChunkProgress:
    """Chunks of the plan whose summary is written, and the structures they accepted and quarantined."""

    done: int = 0
    total: int = 0
    accepted: int = 0
    quarantined: int = 0


def write_plan(out_dir: Path, config: DataConfig, chunks: list[Chunk]) -> None:
    """Record the planned chunks (``PLAN_FILE``): `chunk_progress` counts against it."""
    plan = {"fingerprint": config.fingerprint(), "chunks": [c.chunk_id for c in chunks]}
    write_atomic(Path(out_dir) / PLAN_FILE, json.dumps(plan))


class ChunkCounter:
    """How far the planned chunks of ``out_dir`` are, read as they are written. Each chunk summary is read
    once, and the ``parts`` folder is listed again only when it changed (its mtime) or ``RELIST_S`` passed,
    so that polling a preparation of thousands of chunks costs a ``stat``."""

    RELIST_S = 5.0

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.counted: dict[str, tuple[int, int]] = {}  # chunk id: accepted, quarantined
        self._seen: tuple[float, float] | None = None  # (mtime of parts/, when listed)
        self._last: ChunkProgress | None = None

    def progress(self) -> ChunkProgress | None:
        """None before a plan is written."""
        try:
            changed = (self.out_dir / "parts").stat().st_mtime_ns
        except OSError:
            changed = 0
        if self._seen and self._seen[0] == changed and time.monotonic() - self._seen[1] < self.RELIST_S:
            return self._last
        self._seen = (changed, time.monotonic())
        self._last = self._count()
        return self._last

    def _count(self) -> ChunkProgress | None:
        try:
            plan = json.loads((self.out_dir / PLAN_FILE).read_text())
        except (OSError, ValueError):
            self._seen = None  # no plan yet: look again next time
            return None
        try:
            written = {n[:-5] for n in os.listdir(self.out_dir / "parts") if n.endswith(".json")}
        except OSError:
            written = set()
        for chunk_id in (set(plan["chunks"]) & written) - self.counted.keys():
            try:
                summary = json.loads((self.out_dir / "parts" / f"{chunk_id}.json").read_text())
            except (OSError, ValueError):
                continue
            if summary.get("fingerprint") == plan["fingerprint"]:
                self.counted[chunk_id] = (summary["n_structures"], summary["n_rejected"])
        mine = [self.counted[c] for c in plan["chunks"] if c in self.counted and c in written]
        return ChunkProgress(len(mine), len(plan["chunks"]), sum(a for a, _ in mine), sum(q for _, q in mine))


def _paths(chunk: Chunk, out_dir: Path) -> tuple[Path, Path]:
    parts = Path(out_dir) / "parts"
    return parts / f"{chunk.chunk_id}.json", parts / f"{chunk.chunk_id}.quarantine.jsonl"


def _reusable(chunk: Chunk, config: DataConfig, out_dir: Path) -> ChunkResult | None:
    summary_path, quarantine_path = _paths(chunk, out_dir)
    if not (summary_path.exists() and quarantine_path.exists()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None
    if summary.get("fingerprint") != config.fingerprint() or summary.get("chunk") != asdict(chunk):
        return None
    for entry in summary["shards"]:
        path = Path(out_dir) / entry["file"]
        if not path.exists() or file_sha256(path) != entry["sha256"]:
            return None
    return ChunkResult(
        chunk,
        summary["shards"],
        summary["n_structures"],
        summary["n_rejected"],
        summary["stats"],
        reused=True,
    )


def _validated(chunk: Chunk, config: DataConfig) -> Iterator[Record | tuple[int | str, Rejected]]:
    for index, atoms in read_records(Path(chunk.source), chunk.format, chunk.start, chunk.stop, chunk.offset):
        try:
            if isinstance(atoms, Exception):
                raise Rejected("record", f"malformed: {atoms}")
            yield check(atoms, chunk.source, index, config)
        except Rejected as rejected:
            if config.strict:
                raise StrictModeError(chunk.source, index, rejected) from None
            yield index, rejected


def write_chunk(chunk: Chunk, config: DataConfig, out_dir: Path) -> ChunkResult:
    """Validate, graph and shard one chunk; skipped when its earlier outputs verify."""
    out_dir = Path(out_dir)
    reused = _reusable(chunk, config, out_dir)
    if reused is not None:
        return reused
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    summary_path, quarantine_path = _paths(chunk, out_dir)
    summary_path.unlink(missing_ok=True)
    for stale in (out_dir / "shards").glob(f"{chunk.chunk_id}-*"):  # old shards and .tmp leftovers
        stale.unlink()

    by_split: dict[str, list[Record]] = {"train": [], "val": []}
    rejected = []
    for item in _validated(chunk, config):
        if isinstance(item, Record):
            by_split[split_of(chunk.source, item.index, config.val_fraction)].append(item)
        else:
            index, reason = item
            rejected.append(
                {"source": chunk.source, "index": index, "reason": str(reason), "field": reason.field}
            )

    shards = []
    for split, records in by_split.items():
        for k in range(0, len(records), config.shard_size):
            path = out_dir / "shards" / f"{chunk.chunk_id}-{split}-{k // config.shard_size:03d}.h5"
            entry = write_shard(path, records[k : k + config.shard_size], split, chunk.source, config.cutoff)
            shards.append({**entry, "file": f"shards/{path.name}"})
    stats = manifest.chunk_stats((r, split) for split, records in by_split.items() for r in records)
    write_atomic(quarantine_path, "".join(json.dumps(line) + "\n" for line in rejected).encode())
    n_structures = sum(len(records) for records in by_split.values())
    summary = {
        "chunk": asdict(chunk),
        "fingerprint": config.fingerprint(),
        "shards": shards,
        "n_structures": n_structures,
        "n_rejected": len(rejected),
        "stats": stats,
    }
    manifest.write_json(summary_path, summary, indent=None)  # read by finalize only: no indentation
    return ChunkResult(chunk, shards, n_structures, len(rejected), json.loads(json.dumps(stats)))


def _source_warnings(config: DataConfig, results: list[ChunkResult], quarantine: Path) -> list[str]:
    """A line for each source that gave no structure: an empty file, or one whose records were all
    rejected."""
    counts = {str(source): [0, 0] for source in config.sources}  # accepted, rejected
    for r in results:
        count = counts.setdefault(r.chunk.source, [0, 0])
        count[0] += r.n_structures
        count[1] += r.n_rejected
    messages = []
    for source, (n_accepted, n_rejected) in counts.items():
        if n_accepted + n_rejected == 0:
            messages.append(f"{source}: no records (an empty file?); it adds nothing to the dataset")
        elif n_accepted == 0:
            which = f"all {n_rejected} records were" if n_rejected > 1 else "its one record was"
            messages.append(f"{source}: {which} rejected; the reasons are in {quarantine}")
    return messages


def _check_not_empty(config: DataConfig, results: list[ChunkResult], quarantine: Path) -> None:
    n_train = sum(e["n_structures"] for r in results for e in r.shards if e["split"] == "train")
    if n_train:
        return
    n_val = sum(r.n_structures for r in results)
    n_rejected = sum(r.n_rejected for r in results)
    inputs = ", ".join(str(s) for s in config.sources)
    why = (
        f"all {n_val} accepted structures fell into the validation split (val_fraction {config.val_fraction})"
        if n_val
        else f"no structure was accepted ({n_rejected} records rejected, reasons in {quarantine})"
    )
    raise EmptyDatasetError(f"no training structures from {inputs}: {why}")


def finalize(out_dir: Path, config: DataConfig, results: list[ChunkResult]) -> dict:
    """Merge the chunks' quarantine parts and statistics; write ``quarantine.jsonl`` and ``manifest.json``.

    A source that gave no structure is warned about (`DataWarning`) and listed under the manifest's
    ``warnings``; when no structure is left for training, nothing can be trained on, and this raises
    `EmptyDatasetError` after writing the quarantine report and before writing the manifest."""
    out_dir = Path(out_dir)
    results = sorted(results, key=lambda r: (str(r.chunk.source), r.chunk.start))
    lines = [_paths(r.chunk, out_dir)[1].read_text() for r in results]
    quarantine = out_dir / "quarantine.jsonl"
    write_atomic(quarantine, "".join(lines).encode())
    problems = _source_warnings(config, results, quarantine)
    for message in problems:
        warnings.warn(message, DataWarning, stacklevel=2)
    _check_not_empty(config, results, quarantine)
    settings = {
        "cutoff": config.cutoff,
        "three_body_cutoff": config.three_body_cutoff,
        "min_distance": config.min_distance,
        "max_volume_per_atom": config.max_volume_per_atom,
        "reject_isolated_atoms": config.reject_isolated_atoms,
        "val_fraction": config.val_fraction,
        "shard_size": config.shard_size,
        "fingerprint": config.fingerprint(),
    }
    shards = [entry for r in results for entry in r.shards]
    stats = manifest.merge_stats([r.stats for r in results])
    data = manifest.build(
        settings, shards, stats, sum(r.n_rejected for r in results), [str(s) for s in config.sources]
    )
    data["warnings"] = problems
    manifest.write_json(out_dir / "manifest.json", data)
    return data


def prepare(config: DataConfig, out_dir: Path) -> dict:
    """Plan, write every chunk and finalize, serially; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return finalize(out_dir, config, [write_chunk(c, config, out_dir) for c in plan_chunks(config)])


def problem(out_dir: Path) -> str | None:
    """What keeps ``out_dir`` from being a complete, verified preparation (naming the file), or None."""
    path = Path(out_dir) / "manifest.json"
    if not path.exists():
        return f"{path} does not exist"
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path} is unreadable ({error})"
    if not isinstance(data, dict) or "shards" not in data:
        return f"{path} lists no shards"
    for entry in data["shards"]:
        shard = Path(out_dir) / entry["file"]
        if not shard.exists():
            return f"shard {shard} is missing"
        if file_sha256(shard) != entry["sha256"]:
            return f"shard {shard} does not match its sha256 in {path}"
    return None


def is_complete(out_dir: Path) -> bool:
    """True when ``manifest.json`` exists and every shard it lists verifies against its sha256."""
    return problem(out_dir) is None
