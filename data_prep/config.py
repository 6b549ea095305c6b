"""Settings of one data-preparation run; the same object drives the CLI, `prepare` and the Parsl apps."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Format = Literal["auto", "extxyz", "asedb", "mptrj", "aselmdb"]


class DataWarning(UserWarning):
    """Something in the inputs that is not an error but loses data: an input given twice, an empty file."""


class DataConfig(BaseModel):
    """Inputs, graph cutoffs, validation thresholds, split and shard sizes, and where labels live.

    Label keys name ``atoms.info`` (energy, stress, task, charge, spin) or ``atoms.arrays`` (forces,
    magmoms) entries; when a key is absent the reader's calculator results are used instead, so plain
    ASE files (``energy=``, ``forces``) work with the defaults.

    Sources are files; one file under two spellings (``x/a.xyz``, ``x/../x/a.xyz``, a symlink) is read
    once, by its first spelling, with a `DataWarning`.

    Physical bounds, beyond ``min_distance``: ``max_volume_per_atom`` (Å³, fully periodic cells only; None
    switches it off) rejects cells far emptier than any condensed phase (the bundled crystals reach 137
    Å³/atom, an ideal gas at room temperature and 1 bar ~41,000), which in training data means a cell in
    the wrong unit or a molecule in a box that should be given as non-periodic. ``reject_isolated_atoms``
    rejects a structure with an atom that has no neighbour within ``cutoff``: the model sees such an atom
    as its element alone, so its forces and its share of the energy cannot be learnt, and it usually means
    coordinates in the wrong unit, an exploded geometry or a stray atom.
    """

    model_config = ConfigDict(extra="forbid")

    sources: list[Path] = Field(min_length=1)
    format: Format = "auto"
    cutoff: float = 6.0
    three_body_cutoff: float = 4.0
    min_distance: float = 0.5
    max_volume_per_atom: float | None = 1000.0
    reject_isolated_atoms: bool = True
    val_fraction: float = 0.1
    shard_size: int = 1000
    strict: bool = False
    energy_key: str = "REF_energy"
    forces_key: str = "REF_forces"
    stress_key: str = "REF_stress"
    magmoms_key: str = "REF_magmoms"
    task_key: str = "task"
    charge_key: str = "charge"
    spin_key: str = "spin"
    default_task: str | None = None

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[Path]) -> list[Path]:
        """Each file once: read twice, its records would be stored twice and weigh double in training."""
        first: dict[Path, Path] = {}
        for source in sources:
            resolved = source.resolve()
            if resolved not in first:
                first[resolved] = source
                continue
            warnings.warn(
                f"data.sources: {source} is the same file as {first[resolved]} (both are {resolved}); "
                "reading it once",
                DataWarning,
                stacklevel=2,
            )
        return list(first.values())

    @field_validator("cutoff", "three_body_cutoff")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"cutoffs must be positive, got {value}")
        return value

    @field_validator("min_distance")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"min_distance must be >= 0, got {value}")
        return value

    @field_validator("max_volume_per_atom")
    @classmethod
    def _positive_volume(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(f"max_volume_per_atom must be positive (Å³) or null (no bound), got {value}")
        return value

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"val_fraction must satisfy 0 <= val_fraction < 1, got {value}")
        return value

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"shard_size must be at least 1 structure, got {value}")
        return value

    @model_validator(mode="after")
    def _cutoffs_ordered(self) -> DataConfig:
        if self.three_body_cutoff > self.cutoff:
            raise ValueError(
                f"three_body_cutoff ({self.three_body_cutoff}) must not exceed cutoff ({self.cutoff}): "
                "the line graph is built from the two-body edges"
            )
        if self.min_distance >= self.cutoff:
            raise ValueError(f"min_distance ({self.min_distance}) must be below cutoff ({self.cutoff})")
        return self

    def fingerprint(self) -> str:
        """Hash of every setting that changes a chunk's output except the source list, for reuse checks."""
        from data_prep.shards import SCHEMA_VERSION  # shards imports this module

        settings = {**self.model_dump(mode="json", exclude={"sources"}), "schema_version": SCHEMA_VERSION}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
