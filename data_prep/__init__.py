"""Data preparation: read → validate → neighbour graphs → HDF5 shards + manifest, and the training loader."""

from data_prep.atoms import iter_atoms
from data_prep.config import DataConfig, DataWarning
from data_prep.loader import BatchPlan, GraphDataset, split_for_ranks
from data_prep.pipeline import (
    Chunk,
    ChunkResult,
    EmptyDatasetError,
    finalize,
    is_complete,
    plan_chunks,
    prepare,
    write_chunk,
)
from data_prep.validate import Rejected, StrictModeError

__all__ = [
    "BatchPlan",
    "Chunk",
    "ChunkResult",
    "DataConfig",
    "DataWarning",
    "EmptyDatasetError",
    "GraphDataset",
    "Rejected",
    "StrictModeError",
    "finalize",
    "is_complete",
    "iter_atoms",
    "plan_chunks",
    "prepare",
    "split_for_ranks",
    "write_chunk",
]
