"""Validation during training: per-task errors of the current (and EMA) weights on the held-out split.

Every ``train.eval_every`` steps and after the last one, every rank contributes its shards of the weights
to one full copy (a collective: FSDP and expert shards alike), and rank 0 scores a plain, unsharded copy
of the model on the validation split with the evaluation's own metrics (`evaluation.evaluate.score`: energy,
force and stress MAE, force cosine, the zero-force baseline). Each scored set of weights becomes one line
of ``metrics.jsonl`` marked ``"kind": "validation"`` (`janus.metrics.VALIDATION`).

One number ranks the weights, the training objective's weighting of the held-out errors: the mean over
tasks of ``loss.energy`` × energy MAE (eV/atom) + ``loss.force`` × force MAE (eV/Å). Not a ratio to each
task's "learned nothing" errors: EMT alloy energies lie 6 meV/atom from their reference energies, and such
a ratio would rank weights by one alloy cell's energy. The best weights seen so far, with the EMA's
competing as equals when it is on, are written to ``BEST_WEIGHTS_FILE`` beside the checkpoints; the
export takes them (`janus.export`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_prep.loader import GraphDataset
from evaluation.evaluate import score, select
from janus.export import BEST_WEIGHTS_FILE
from janus.metrics import VALIDATION
from janus.parallel import full_tensor
from matris import MatRIS, ModelConfig
from matris.config import LossConfig
from matris.io import metadata, save

MAX_ATOMS = 2048  # per scored batch; validation runs without gradients of the parameters


class Validator:
    """Scores weights on the validation split of ``data_dir`` (rank 0) and keeps the best."""

    def __init__(
        self, data_dir: Path, out_dir: Path, model_cfg: ModelConfig, loss: LossConfig, dtype: torch.dtype,
        is_main: bool, max_per_task: int, resumed: bool,
    ):  # fmt: skip
        self.is_main, self.dtype, self.model_cfg, self.loss = is_main, dtype, model_cfg, loss
        self.best_path = Path(out_dir) / BEST_WEIGHTS_FILE
        self.best_score = float("inf")
        if not is_main:
            return
        if not resumed:
            self.best_path.unlink(missing_ok=True)  # another run's weights: this one starts afresh
        elif self.best_path.is_file():
            self.best_score = float(metadata(self.best_path).get("val_score", float("inf")))
        dataset = GraphDataset(data_dir, split="val", cutoff=model_cfg.cutoff)
        tasks = np.array([dataset[i].task for i in range(len(dataset))], dtype=np.int64)
        chosen = select(tasks, len(dataset.tasks), max_per_task)
        self.graphs = {i: dataset[i] for i in chosen}
        self.tasks, self.sizes = dataset.tasks, dataset.sizes
        self.plain: MatRIS | None = None

    def run(self, model: nn.Module, step: int, ema: dict[str, torch.Tensor] | None = None) -> list[dict]:
        """Collective: every rank calls it. Rank 0 returns one record per scored set of weights."""
        weights = {"model": _full_state(model.state_dict())}
        if ema is not None:
            weights["ema"] = {**weights["model"], **_full_state(ema)}
        if not self.is_main or not self.graphs:
            return []
        records = [self._score(state, kind, step) for kind, state in weights.items()]
        best = min(records, key=lambda r: r["score"])
        if best["score"] < self.best_score:
            self.best_score = best["score"]
            best["best"] = True
            self._keep(weights[best["weights"]], best)
        return records

    def _score(self, state: dict[str, torch.Tensor], kind: str, step: int) -> dict[str, Any]:
        tic = time.perf_counter()
        if self.plain is None:
            self.plain = MatRIS(self.model_cfg).to(self.dtype)
        self.plain.load_state_dict(state)
        self.plain.eval()
        label = Path(f"<{kind} weights>")
        tasks, _ = score(self.plain, label, self.graphs, self.tasks, self.sizes, MAX_ATOMS)
        energy, force = self.loss.energy / 1000, self.loss.force / 1000  # meV → eV
        parts = [energy * v["energy_mae_mev_per_atom"] + force * v["force_mae_mev_per_a"]
                 for v in tasks.values()]  # fmt: skip
        return {
            "step": step,
            "kind": VALIDATION,
            "weights": kind,
            "score": float(np.mean(parts)),
            "best": False,
            "tasks": tasks,
            "seconds": time.perf_counter() - tic,
        }

    def _keep(self, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        assert self.plain is not None
        self.plain.load_state_dict(state)
        info = {"step": record["step"], "weights": record["weights"], "val_score": record["score"]}
        save(self.plain, self.best_path, metadata=info)


def _full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies (every rank must call this: gathering a DTensor is a collective)."""
    return {name: full_tensor(value).detach().cpu() for name, value in state.items()}


def describe(records: list[dict[str, Any]]) -> str:
    """One console line per validation: per task force MAE against its zero-force baseline, cosine and
    energy MAE."""
    lines = []
    for record in records:
        tasks = "; ".join(
            f"{task} F {v['force_mae_mev_per_a']:.0f}/{v['force_zero_mae_mev_per_a']:.0f} meV/Å "
            f"cos {v['force_cosine']:.2f} E {v['energy_mae_mev_per_atom']:.0f} meV/atom"
            for task, v in record["tasks"].items()
        )
        mark = " (best)" if record["best"] else ""
        lines.append(
            f"janus: validation at step {record['step']} ({record['weights']} weights): {tasks}; "
            f"score {record['score']:.3f}{mark}"
        )
    return "\n".join(lines)
