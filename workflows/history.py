"""Scaling results: the SQLite history, the regression verdict against a rolling baseline, and the report.

One row per rung per run, keyed by site, commit, model preset, layout and date. The baseline of a rung is
the median over the last N runs of the same site, preset, layout, mode and node count that were not
themselves flagged, so one bad night neither hides nor becomes the norm.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from matris.io import replacing, write_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS rungs (
    run_id TEXT NOT NULL, date TEXT NOT NULL, site TEXT NOT NULL, git_commit TEXT NOT NULL,
    preset TEXT NOT NULL, layout TEXT NOT NULL, mode TEXT NOT NULL, nodes INTEGER NOT NULL,
    ranks INTEGER NOT NULL, step_time_median REAL, step_time_spread REAL, atoms_per_s REAL,
    per_rank_atoms_per_s REAL, efficiency REAL, flop_efficiency REAL, comm_fraction REAL,
    peak_memory_bytes INTEGER, regression INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, site, mode, nodes)
)
"""


@dataclass
class RungResult:
    mode: str
    nodes: int
    ranks: int
    step_time_median: float
    step_time_spread: float
    atoms_per_s: float
    per_rank_atoms_per_s: float
    flop_efficiency: float | None
    comm_fraction: float | None
    peak_memory_bytes: int
    efficiency: float = 1.0

    @property
    def rung(self) -> str:
        return f"{self.mode}-n{self.nodes}"


@dataclass(frozen=True)
class RunKey:
    site: str
    commit: str
    preset: str
    layout: str


@dataclass
class Verdict:
    rung: str
    regression: bool
    reason: str
    baseline_efficiency: float | None = None
    baseline_per_rank: float | None = None


def git_commit() -> str:
    """The short commit of this source tree, or "unknown" outside a git checkout."""
    from janus.export import source_commit

    return (source_commit() or "unknown")[:12]


class History:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def judge(
        self, key: RunKey, results: list[RungResult], window: int, tolerance: float
    ) -> dict[str, Verdict]:
        verdicts = {}
        with self._connect() as db:
            for r in results:
                rows = db.execute(
                    "SELECT efficiency, per_rank_atoms_per_s FROM rungs WHERE site=? AND preset=? "
                    "AND layout=? AND mode=? AND nodes=? AND regression=0 ORDER BY date DESC LIMIT ?",
                    (key.site, key.preset, key.layout, r.mode, r.nodes, window),
                ).fetchall()
                verdicts[r.rung] = _verdict(r, rows, tolerance)
        return verdicts

    def append(
        self, key: RunKey, run_id: str, results: list[RungResult], verdicts: dict[str, Verdict]
    ) -> None:
        date = time.strftime("%Y-%m-%dT%H:%M:%S")
        with self._connect() as db:
            for r in results:
                row = {
                    **asdict(r), "run_id": run_id, "date": date, "site": key.site,
                    "git_commit": key.commit, "preset": key.preset, "layout": key.layout,
                    "regression": int(verdicts[r.rung].regression),
                }  # fmt: skip
                names = ", ".join(row)
                db.execute(f"INSERT OR REPLACE INTO rungs ({names}) VALUES ({', '.join('?' * len(row))})",
                           tuple(row.values()))  # fmt: skip

    def trend(self, key: RunKey) -> list[dict]:
        """Every past row of this site, preset and layout, oldest first (for the plots)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM rungs WHERE site=? AND preset=? AND layout=? ORDER BY date",
                (key.site, key.preset, key.layout),
            ).fetchall()
        return [dict(row) for row in rows]


def _verdict(r: RungResult, rows: list[tuple], tolerance: float) -> Verdict:
    if not rows:
        return Verdict(r.rung, False, "no baseline yet (first run of this rung)")
    base_eff = statistics.median(row[0] for row in rows)
    base_thr = statistics.median(row[1] for row in rows)
    floor = 1 - tolerance
    problems = []
    if r.efficiency < floor * base_eff:
        problems.append(f"efficiency {r.efficiency:.3f} < {floor:.2f} × baseline {base_eff:.3f}")
    if r.per_rank_atoms_per_s < floor * base_thr:
        problems.append(
            f"per-rank throughput {r.per_rank_atoms_per_s:.1f} atoms/s "
            f"< {floor:.2f} × baseline {base_thr:.1f}"
        )
    reason = "; ".join(problems) or f"within {tolerance:.0%} of the baseline of {len(rows)} run(s)"
    return Verdict(r.rung, bool(problems), reason, base_eff, base_thr)


def write_report(
    out_dir: Path, key: RunKey, run_id: str, results: list[RungResult], verdicts: dict[str, Verdict],
    trend: list[dict],
) -> str:  # fmt: skip
    """``report.md``, ``efficiency.png`` and ``throughput.png`` in ``out_dir``; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = [v for v in verdicts.values() if v.regression]
    lines = [
        f"# Scaling report {run_id}",
        "",
        f"site `{key.site}`, commit `{key.commit}`, model `{key.preset}`, layout `{key.layout}`",
        "",
        "| mode | nodes | ranks | step time median (s) | spread (s) | atoms/s | per-rank atoms/s "
        "| efficiency | FLOP eff. | comm. share | peak mem (MiB) | baseline eff. | verdict |",
        "|" + " --- |" * 13,
    ]
    for r in results:
        v = verdicts[r.rung]
        lines.append(
            f"| {r.mode} | {r.nodes} | {r.ranks} | {r.step_time_median:.3f} | {r.step_time_spread:.3f} "
            f"| {r.atoms_per_s:.1f} | {r.per_rank_atoms_per_s:.1f} | {r.efficiency:.3f} "
            f"| {_pct(r.flop_efficiency)} | {_pct(r.comm_fraction)} | {r.peak_memory_bytes / 2**20:.0f} "
            f"| {'—' if v.baseline_efficiency is None else f'{v.baseline_efficiency:.3f}'} "
            f"| {'**REGRESSION**: ' + v.reason if v.regression else 'ok'} |"
        )
    verdict = "**REGRESSION** in " + ", ".join(v.rung for v in bad) if bad else "no regression"
    lines += [
        "",
        f"Verdict: {verdict}.",
        "",
        "![efficiency](efficiency.png) ![throughput](throughput.png)",
        "",
    ]
    text = "\n".join(lines)
    write_atomic(out_dir / "report.md", text)
    _plot(out_dir, results, trend, run_id)
    return text


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _plot(out_dir: Path, results: list[RungResult], trend: list[dict], run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, field, label in (
        ("efficiency.png", "efficiency", "efficiency E(N)"),
        ("throughput.png", "per_rank_atoms_per_s", "per-rank throughput (atoms/s)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in sorted({r.mode for r in results}):
            past = [row for row in trend if row["mode"] == mode and row["run_id"] != run_id]
            nodes = sorted({row["nodes"] for row in past})
            if nodes:
                med = [statistics.median(row[field] for row in past if row["nodes"] == n) for n in nodes]
                lo = [min(row[field] for row in past if row["nodes"] == n) for n in nodes]
                hi = [max(row[field] for row in past if row["nodes"] == n) for n in nodes]
                ax.fill_between(nodes, lo, hi, alpha=0.2)
                ax.plot(
                    nodes,
                    med,
                    "--",
                    label=f"{mode}: history median ({len({r['run_id'] for r in past})} runs)",
                )
            now = sorted((r for r in results if r.mode == mode), key=lambda r: r.nodes)
            ax.plot([r.nodes for r in now], [getattr(r, field) for r in now], "o-", label=f"{mode}: this run")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nodes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with replacing(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
