"""`train/metrics.jsonl`: one JSON object per optimizer step, written by rank 0, and one per scored set of
weights at each validation, marked ``"kind": VALIDATION`` (`janus.validation`).

On resume the log is cut back to the checkpoint's step first, so a killed-and-resumed run has exactly one
line per step and the loss curve continues where the checkpoint left it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from matris.io import write_atomic

VALIDATION = "validation"


class MetricsLog:
    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._handle = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue
        write_atomic(self.path, "".join(line + "\n" for line in kept))


def read(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xpu":
        return int(torch.xpu.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def training_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records of a ``metrics.jsonl``'s rows (validation records left out)."""
    return [r for r in rows if r.get("kind") != VALIDATION and "step" in r]


def validation_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == VALIDATION]
