"""Model and loss configuration, with the published model sizes as presets.

Parameter budget of one interaction block (d = ``dim``, h = ``expert_hidden``, E experts, K of them
active, S shared): attention and bond refinement ≈ 17 d², plus two MoE layers (message construction and
feature update) of 2 · 3 d h (E + S) parameters in total, 2 · 3 d h (K + S) active. Six blocks, all MoE:

| preset | d    | h    | E  | K  | S | total (paper)    | active (paper)   |
| ------ | ---- | ---- | -- | -- | - | ---------------- | ---------------- |
| moe-s  | 768  | 1152 | 32 | 4  | 0 | 1.081 B (1.09 B) | 0.189 B (0.19 B) |
| moe-m  | 1152 | 1152 | 48 | 8  | 1 | 2.480 B (2.47 B) | 0.569 B (0.56 B) |
| moe-l  | 1024 | 4800 | 64 | 16 | 0 | 11.43 B (11.5 B) | 2.941 B (2.89 B) |

The expert count sets the total/active ratio (≈ (E + S) / (K + S) once attention is small) and the
widths then set the active size; ``tests/test_matris.py`` checks the counts on the meta device within 3 %.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Architecture of a MatRIS(-MoE) model; ``tasks`` is the task vocabulary (set from the data manifest)."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "custom"
    dim: int = 128  # atom and bond feature width
    num_blocks: int = 6
    num_heads: int = 8
    num_radial: int = 7
    num_angular: int = 7  # Legendre polynomials P_0..P_6 of the bond angle
    cutoff: float = 6.0
    three_body_cutoff: float = 4.0
    score_cap: float = 5.0  # attention scores are soft-capped to ±score_cap
    mlp_hidden: int = 256  # hidden width of the gated MLPs of dense blocks
    moe_blocks: list[int] = []  # indices of blocks whose two feed-forward layers are MoE
    num_experts: int = 1
    top_k: int = 1
    num_shared_experts: int = 0
    expert_hidden: int = 256
    tasks: list[str] = ["default"]
    max_z: int = 118
    magmom_head: bool = False
    # degree buckets of the dense line graph: fewer pad more, more run more batched calls; every count gives
    # the same energies (padding contributes exact zeros)
    line_buckets: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if not 0 < self.three_body_cutoff <= self.cutoff:
            raise ValueError("three_body_cutoff must lie in (0, cutoff]")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must lie in [1, num_experts={self.num_experts}]")
        if any(not 0 <= i < self.num_blocks for i in self.moe_blocks):
            raise ValueError(f"moe_blocks {self.moe_blocks} outside [0, {self.num_blocks})")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of unique names, got {self.tasks}")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})


def _moe(dim: int, hidden: int, experts: int, top_k: int, shared: int) -> dict[str, Any]:
    return dict(
        dim=dim,
        num_heads=16,
        num_blocks=6,
        moe_blocks=list(range(6)),
        num_experts=experts,
        top_k=top_k,
        num_shared_experts=shared,
        expert_hidden=hidden,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        dim=32,
        num_heads=4,
        num_blocks=2,
        moe_blocks=[0, 1],
        num_experts=4,
        top_k=2,
        num_shared_experts=1,
        expert_hidden=32,
        num_angular=4,
    ),
    "matris-6l": dict(dim=128, num_heads=8, num_blocks=6, mlp_hidden=256),
    "moe-s": _moe(768, 1152, 32, 4, 0),
    "moe-m": _moe(1152, 1152, 48, 8, 1),
    "moe-l": _moe(1024, 4800, 64, 16, 0),
}


class FinalLossStage(BaseModel):
    """Weights for the last part of a run, as MACE's final stage (its "SWA" weights) shifts weight to
    energies once the forces have been learned."""

    model_config = ConfigDict(extra="forbid")

    start: float = Field(0.7, gt=0, lt=1, description="fraction of the run (steps or time budget) done")
    energy: float = Field(ge=0)
    force: float = Field(ge=0)
    stress: float = Field(0.1, ge=0)


class LossConfig(BaseModel):
    """Weights of the multi-task loss and its robustness.

    The paper weighs energy:force:stress:magmom = 5:5:0.1:0.1. On the four-task mix of the bundled sample
    that weighting taught tiny no crystal forces: both terms are absolute errors, so each pulls with the
    same strength whatever its size, and the energy term, whose per-atom residuals after the reference
    energies stay large and hard to fit, pushed crystals to the zero-force answer (held-out force cosine
    0.41 after 600 steps). Force-heavy weights learn them (0.80 at 1:20, 0.71 at 2:10), as MACE's 1:100 on
    squared errors does. Those weights leave the energies no better than the reference energies, so the
    last 30 % of a run goes back to the paper's 5:5 (``final``): held-out energy errors then fall below the
    reference energies' on every task with the force errors unchanged.
    `benchmarks/results/learning_2026-12-07_cpu2.md` has the runs.
    """

    model_config = ConfigDict(extra="forbid")

    energy: float = 1.0
    force: float = 20.0
    stress: float = 0.1
    magmom: float = 0.1
    aux: float = 0.01  # MoE load-balancing
    outlier_k: float = 3.0  # samples beyond μ + kσ of their task are smoothly down-weighted
    final: FinalLossStage | None = Field(
        default_factory=lambda: FinalLossStage(energy=5.0, force=5.0),
        description="weights for the end of the run (null: the same weights throughout)",
    )

    def at(self, progress: float) -> LossConfig:
        """The weights in force once ``progress`` (0 → 1) of the run is done."""
        if self.final is None or progress < self.final.start:
            return self
        stage = self.final
        return self.model_copy(update={"energy": stage.energy, "force": stage.force, "stress": stage.stress})
