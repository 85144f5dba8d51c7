"""Where metrics go. `MetricsLogger` is the boundary; MLflow (a later issue) implements it too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlMetrics:
    """One JSON object per logged step in <run_dir>/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w")  # a fresh run; resuming will append (checkpoint issue)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class NullMetrics:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
