"""PNG figures of an evaluation: parity plots per task and the training curves.

Figures are drawn on matplotlib ``Figure`` objects with the Agg canvas, never through ``pyplot``, so they
need no display and leave no global state in a Parsl worker that plots several runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from matris.io import write_atomic

MAX_POINTS = 5000  # force components drawn per task; more only slows the PNG down


def parity_plot(parity: dict[str, dict[str, list[np.ndarray]]], path: Path, seed: int = 0) -> Path:
    """Predicted against reference energies (eV/atom) and force components (eV/Å), one column per task.

    ``parity[task]`` holds ``energy_ref``, ``energy_pred``, ``force_ref``, ``force_pred`` as lists of arrays.
    """
    tasks = sorted(parity)
    figure = Figure(figsize=(3.2 * max(len(tasks), 1), 6.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, max(len(tasks), 1), squeeze=False)
    rng = np.random.default_rng(seed)
    for column, task in enumerate(tasks):
        for row, (kind, unit) in enumerate((("energy", "eV/atom"), ("force", "eV/Å"))):
            ref = np.concatenate(parity[task][f"{kind}_ref"]).ravel()
            pred = np.concatenate(parity[task][f"{kind}_pred"]).ravel()
            if len(ref) > MAX_POINTS:
                keep = rng.choice(len(ref), MAX_POINTS, replace=False)
                ref, pred = ref[keep], pred[keep]
            ax = axes[row, column]
            ax.scatter(ref, pred, s=4, alpha=0.5, linewidths=0)
            low, high = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([low, high], [low, high], color="black", linewidth=0.8)
            ax.set_title(f"{task}: {kind} (MAE {np.abs(pred - ref).mean() * 1000:.1f} m{unit})", fontsize=8)
            ax.set_xlabel(f"reference {kind} ({unit})", fontsize=8)
            ax.set_ylabel(f"predicted {kind} ({unit})", fontsize=8)
            ax.tick_params(labelsize=7)
    figure.savefig(path, dpi=110)
    return Path(path)


def training_curves(metrics_jsonl: Path, path: Path) -> Path | None:
    """Loss (total and per task and label), learning rate and throughput against step, and the validation
    errors per task beside them, from the trainer's ``metrics.jsonl`` (its validation lines carry
    ``"kind": "validation"``, `janus.metrics`); None when the file is missing or has no step."""
    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.is_file():
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    validation = [r for r in rows if r.get("kind") == "validation"]
    rows = [r for r in rows if "step" in r and r.get("kind") != "validation"]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])

    def series(key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in rows], dtype=float)

    figure = Figure(figsize=(15, 7), layout="constrained")
    FigureCanvasAgg(figure)
    (loss, parts, forces), (lr, speed, energies) = figure.subplots(2, 3)
    loss.semilogy(steps, series("loss"))
    loss.set_title("total loss")
    for key in sorted({k for r in rows for k in r if "/" in k}):
        values = series(key)
        present = np.isfinite(values) & (values > 0)  # a task is absent from the batches of some steps
        if present.any():
            parts.semilogy(
                steps[present], values[present], label=key, linewidth=0.9, marker=".", markersize=3
            )
    parts.set_title("per-task losses (steps whose batch held the task)")
    if parts.lines:
        parts.legend(fontsize=6)
    _validation_curves(validation, forces, energies)
    lr.plot(steps, series("lr"))
    lr.set_title("learning rate")
    speed.plot(steps, series("atoms_per_s"))
    speed.set_title("throughput (atoms/s)")
    for ax in (loss, parts, forces, lr, speed, energies):
        ax.set_xlabel("step")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=110)
    write_atomic(Path(path), png.getvalue())  # `parsl-run status --plot` may draw it while a run does
    return Path(path)


def _validation_curves(records: list[dict], forces, energies) -> None:
    """Held-out force MAE over the zero-force MAE (1 = no force learned) and energy MAE, per task; the
    EMA's weights dashed."""
    forces.set_title("validation: force MAE / zero-force MAE")
    energies.set_title("validation: energy MAE (meV/atom)")
    for kind, style in (("model", "-"), ("ema", "--")):
        chosen = [r for r in records if r["weights"] == kind]
        for task in sorted({t for r in chosen for t in r["tasks"]}):
            own = [r for r in chosen if task in r["tasks"]]
            steps = [r["step"] for r in own]
            ratio = [r["tasks"][task]["force_mae_mev_per_a"] / r["tasks"][task]["force_zero_mae_mev_per_a"]
                     for r in own]  # fmt: skip
            label = task if kind == "model" else f"{task} (EMA)"
            forces.plot(steps, ratio, style, marker="o", markersize=3, label=label)
            energies.semilogy(steps, [r["tasks"][task]["energy_mae_mev_per_atom"] for r in own], style,
                              marker="o", markersize=3, label=label)  # fmt: skip
    if forces.lines:
        forces.axhline(1.0, color="grey", linewidth=0.6)
        forces.legend(fontsize=6)
        energies.legend(fontsize=6)
