"""Configuration of one training job: model, optimisation, parallel layout, where data and outputs live.

`python -m janus.train --config FILE` reads a YAML file of this shape; the Parsl workflow writes it from the
run config, so both share these classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from matris.config import LossConfig, ModelConfig


class LayoutError(ValueError):
    """The parallel layout does not fit the world size or the model."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelChoice(Strict):
    """A named preset plus field overrides, resolved to a full `matris.ModelConfig` once tasks are known."""

    preset: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from matris.config import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown model preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    def resolve(self, tasks: list[str] | None = None) -> ModelConfig:
        """The full model config; a bad override fails naming ``model.overrides``."""
        try:
            fields = {**({"tasks": tasks} if tasks else {}), **self.overrides}
            return ModelConfig.from_preset(self.preset, **fields)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"model.overrides of preset {self.preset!r}: {problems}") from None


class ParallelConfig(Strict):
    """Sizes of the (dp, graph, expert) device mesh; their product is the number of training ranks."""

    dp: int = Field(1, ge=1)
    graph: int = Field(1, ge=1)
    expert: int = Field(1, ge=1)
    auto: bool = Field(
        False, description="chosen by the layout planner (`janus.layout`); a scaling ladder plans each rung"
    )

    @property
    def world_size(self) -> int:
        return self.dp * self.graph * self.expert


class TrainConfig(Strict):
    steps: int = Field(600, ge=1)
    seed: int = 0
    lr: float = Field(4e-3, gt=0, description="peak learning rate at the reference batch size")
    lr_reference_atoms: int = Field(
        512, ge=1, description="learning rate scales with sqrt(max_atoms_per_batch / this)"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warm-up steps (null: 10, or a tenth of a run shorter than 100 steps)"
    )
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(1e-3, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the weights (null: none)")
    max_atoms_per_batch: int = Field(512, ge=1, description="global batch budget, split over ranks")
    max_edges_per_batch: int | None = Field(None, ge=1)
    max_triplets_per_batch: int | None = Field(
        None, ge=1, description="line-graph triplets per global batch (dense cells have ~250 per atom)"
    )
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="stop once training (steps, validation, checkpoints) has taken this many seconds; "
        "the learning rate then decays over whichever budget, steps or seconds, runs out first",
    )
    checkpoint_every: int = Field(25, ge=1)
    eval_every: int = Field(
        100, ge=0, description="validate on the held-out split every N steps and after the last (0: never)"
    )
    eval_max_structures: int = Field(50, ge=1, description="held-out structures per task scored each time")
    keep_checkpoints: int = Field(2, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    kernels: Literal["auto", "plain", "compiled", "cpu"] = Field(
        "auto", description="how the fused ops run (matris.fused.select_kernels)"
    )
    sleep_per_step_s: float = Field(0.0, ge=0, description="injected delay (scaling-regression tests)")
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="peak TFLOP/s of one rank for flop_efficiency (default: known GPU or measured)",
    )


    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(10, self.steps // 10)

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_steps >= self.steps > 1:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps}); "
                "leave it unset to scale with the run"
            )
        return self


def check_layout(parallel: ParallelConfig, model: ModelConfig) -> None:
    """Layout problems that need no process group (the world size is checked by `janus.parallel`)."""
    expert = parallel.expert
    if expert > 1 and not model.moe_blocks:
        raise LayoutError(f"parallel.expert = {expert} but model preset {model.preset!r} has no MoE layers")
    if expert > 1 and model.num_experts % expert:
        raise LayoutError(
            f"parallel.expert = {expert} does not divide the model's {model.num_experts} experts"
        )


class JanusConfig(Strict):
    model: ModelChoice = Field(default_factory=ModelChoice)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data_dir: Path
    out_dir: Path

    @model_validator(mode="after")
    def _layout_fits_model(self) -> JanusConfig:
        check_layout(self.parallel, self.model.resolve())
        return self
