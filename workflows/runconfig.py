"""The run config: what data, which model, how long, which parallel layout, where it runs.

Resolved as defaults ← ``--config RUN.yaml`` ← ``--set key.path=value``, and validated as a whole before
Parsl starts, so a bad value fails with the field's name and nothing is submitted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data_prep.config import DataConfig
from janus.config import JanusConfig, ModelChoice, ParallelConfig, TrainConfig, check_layout
from matris.config import LossConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = PROJECT_ROOT / "sample_data"
SAMPLE_SOURCES = sorted(SAMPLE_DATA.glob("*.extxyz.gz"))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LaunchConfig(Strict):
    nodes: int = Field(1, ge=1)
    ranks_per_node: int = Field(1, ge=1)

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


class EvalConfig(Strict):
    max_structures_per_task: int = Field(200, ge=1, description="cap on held-out structures per task")
    md_steps: int = Field(200, ge=0, description="NVE steps per MD stability sample (0: no MD)")
    baseline: Path | None = Field(None, description="another exported model to score side by side")

    @field_validator("baseline")
    @classmethod
    def _baseline_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not Path(path).is_file():
            raise ValueError(f"eval.baseline: model file {path} not found")
        return path


class SiteFields(Strict):
    """Run-config overrides of the site's fields (see `site_configs.schema.SiteConfig`, which validates
    them); unset = the site's default, or the per-user file's value."""

    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    constraint: str | None = None
    walltime: str | int | None = None  # YAML reads an unquoted 12:00:00 as the integer 43200
    nodes_per_block: int | None = None
    gpus_per_node: int | None = None
    cores_per_node: int | None = None
    device_memory_gib: float | None = None
    cpu_bind: str | None = None
    launcher_options: list[str] | None = None
    scheduler_options: list[str] | None = None
    filesystems: str | None = None
    worker_init: str | None = None
    environment: dict[str, str] | None = None
    backend: str | None = None
    address: str | None = None
    stage_partition: str | None = None
    stage_walltime: str | int | None = None
    stage_workers: int | None = None
    stage_blocks: int | None = None
    retries: int | None = None
    monitoring: bool | None = None

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RunConfig(Strict):
    data: DataConfig = Field(default_factory=lambda: DataConfig(sources=SAMPLE_SOURCES))
    model: ModelChoice = Field(default_factory=ModelChoice)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    site: SiteFields = Field(default_factory=SiteFields)

    @model_validator(mode="after")
    def _layout_matches_launch(self) -> RunConfig:
        if self.parallel.world_size != self.launch.ranks:
            raise ValueError(
                f"parallel.dp × parallel.graph × parallel.expert = {self.parallel.world_size} must equal "
                f"launch.nodes × launch.ranks_per_node = {self.launch.ranks}"
            )
        check_layout(self.parallel, self.model.resolve())
        missing = [str(p) for p in self.data.sources if not Path(p).exists()]
        if missing:
            raise ValueError(f"data.sources: file(s) not found: {', '.join(missing)}")
        return self


    def janus_config(
        self,
        data_dir: Path,
        out_dir: Path,
        train: TrainConfig | None = None,
        parallel: ParallelConfig | None = None,
    ) -> dict[str, Any]:
        """The per-rank training config that `python -m janus.train --config` reads, validated."""
        return JanusConfig(
            model=self.model,
            loss=self.loss,
            train=train or self.train,
            parallel=parallel or self.parallel,
            data_dir=data_dir,
            out_dir=out_dir,
        ).model_dump(mode="json")


def defaults() -> dict[str, Any]:
    """The default run config as plain data, the base that YAML files and ``--set`` modify."""
    return RunConfig().model_dump(mode="json", exclude={"site"})
