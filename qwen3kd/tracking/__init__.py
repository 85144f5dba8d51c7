"""Where metrics go. `MetricsLogger` is the boundary: metrics.jsonl (always, rank 0) and MLflow
(tracking/mlflow_run.py), both behind `Tee` (tracking/run.py opens them for a job)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from qwen3kd.files import write_text_atomic


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class JsonlMetrics:
    """One JSON object per logged step in <run_dir>/metrics.jsonl (rank 0 only).

    A run resumed at step N keeps the records of steps 1..N (those after N were made by the
    interrupted run past its last checkpoint and are made again) and appends.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            self._f = self.path.open("a")
        else:
            self._f = self.path.open("w")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass  # artifacts are files in the run directory already

    def close(self, status: str = "FINISHED") -> None:
        self._f.close()


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # blank, or cut short by a killed run


class NullMetrics:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
