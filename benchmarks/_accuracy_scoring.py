"""The arithmetic `bench_accuracy.py` scores every model with, importable in a peer's venv (numpy only)."""

from __future__ import annotations

import numpy as np


def score_frames(frames: list, calculator_for) -> dict[str, dict[str, float]]:
    """Per task: energy/force/stress MAE, zero-force MAE and force cosine of ``calculator_for(atoms)``."""
    sums: dict[str, dict[str, float]] = {}
    for atoms in frames:
        task, n = atoms.info["task"], len(atoms)
        ref_e, ref_f = atoms.get_potential_energy(), atoms.get_forces()
        ref_s = atoms.calc.results.get("stress")
        probe = atoms.copy()
        probe.calc = calculator_for(atoms)
        e, f = probe.get_potential_energy(), probe.get_forces()
        s = sums.setdefault(task, dict.fromkeys(("n", "comp", "e", "f", "f0", "dot", "ff", "sn", "s"), 0.0))
        s["n"] += 1
        s["comp"] += 3 * n
        s["e"] += abs(e - ref_e) / n
        s["f"] += float(np.abs(f - ref_f).sum())
        s["f0"] += float(np.abs(ref_f).sum())
        cos = (f * ref_f).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(ref_f, axis=-1) + 1e-12)
        s["dot"] += float(cos.sum())
        s["ff"] += n
        if ref_s is not None and atoms.pbc.all():
            s["sn"] += 1
            s["s"] += float(np.abs(probe.get_stress() - ref_s).mean())
    return {
        task: {
            "structures": int(s["n"]),
            "energy_mae_mev_per_atom": 1000 * s["e"] / s["n"],
            "force_mae_mev_per_a": 1000 * s["f"] / s["comp"],
            "force_zero_mae_mev_per_a": 1000 * s["f0"] / s["comp"],
            "force_cosine": s["dot"] / s["ff"],
            "stress_mae_mev_per_a3": 1000 * s["s"] / s["sn"] if s["sn"] else None,
        }
        for task, s in sorted(sums.items())
    }
