"""`qwen3kd compare`: MLflow runs side by side: key metrics, config differences, plots.

    qwen3kd compare RUN_ID [RUN_ID …] --uri URI [--out DIR]
    qwen3kd compare --experiment NAME --uri URI [--out DIR]

Writes into DIR (default `runs/compare`): `runs.md`, a table of the runs (name, status, parent,
the last value of each key metric) and of the config keys whose values differ between them;
`kl_by_mode.png`, the KL per mode over steps (one line per run that logged it); `accuracy.png`,
the accuracy per mode of each run that has one (`accuracy/<mode>`, logged by `qwen3kd demo` for
every phase); `dev_curves.png`, dev accuracy per mode against steps and against training FLOPs
(`dev/accuracy/<mode>` and `dev/flops` at the steps where they were measured: the demo's arms).
The same runs are browsable with `mlflow ui --backend-store-uri URI`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qwen3kd.errors import ConfigError
from qwen3kd.files import write_text_atomic

log = logging.getLogger(__name__)

KEY_METRICS = ("train/loss", "train/kl", "train/kl/think", "train/kl/no_think", "eval/kl",
               "rollout/mode_compliance/think", "rollout/mode_compliance/no_think",
               "accuracy/think", "accuracy/no_think", "compliance/think", "compliance/no_think",
               "think_tokens/think")
KL_BY_MODE = ("train/kl/think", "train/kl/no_think")
ACCURACY = ("accuracy/think", "accuracy/no_think")
DEV_ACCURACY = ("dev/accuracy/think", "dev/accuracy/no_think")
# Params that differ between any two runs by construction (where they write), not by what they do.
BOOKKEEPING = {"run.name", "run.dir", "checkpoint.dir", "generate.output", "accuracy.output",
               "tracking.parent_run_id"}


@dataclass
class RunInfo:
    run_id: str
    name: str
    status: str
    parent: str | None
    metrics: dict[str, float]
    params: dict[str, str]


def _client(uri: str):
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_runs(client, run_ids: list[str], experiment: str | None) -> list[RunInfo]:
    from mlflow.exceptions import MlflowException

    if run_ids:
        try:
            runs = [client.get_run(r) for r in run_ids]
        except MlflowException as e:
            raise ConfigError(f"compare: {e.message}") from None
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ConfigError(f"compare: no experiment named {experiment!r}")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
        if not runs:
            raise ConfigError(f"compare: experiment {experiment!r} has no runs")
    return [RunInfo(r.info.run_id, r.info.run_name or r.info.run_id[:8], r.info.status,
                    r.data.tags.get("mlflow.parentRunId"), dict(r.data.metrics), dict(r.data.params))
            for r in runs]


def differing_params(runs: list[RunInfo]) -> dict[str, list[str]]:
    """Config keys with two different values among the runs that have them (a parent run that
    logs no config has no say)."""
    keys = sorted(set().union(*(r.params for r in runs)) - BOOKKEEPING)
    out = {}
    for k in keys:
        values = [r.params.get(k) for r in runs]
        if len({v for v in values if v is not None}) > 1:
            out[k] = ["–" if v is None else v for v in values]
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(runs: list[RunInfo]) -> str:
    names = {r.run_id: r.name for r in runs}
    metrics = [m for m in KEY_METRICS if any(m in r.metrics for r in runs)]
    head = ["run", "id", "status", "parent", *metrics]
    rows = [[r.name, r.run_id[:8], r.status, names.get(r.parent, (r.parent or "")[:8]),
             *[r.metrics.get(m, "–") for m in metrics]] for r in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    diff = differing_params(runs)
    lines += ["", f"Config keys that differ ({len(diff)}):", ""]
    if diff:
        lines += ["| key | " + " | ".join(r.name for r in runs) + " |", "|" + "---|" * (len(runs) + 1)]
        lines += ["| " + " | ".join(_cell(c) for c in (k, *v)) + " |" for k, v in diff.items()]
    else:
        lines.append("(none)")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_kl(client, runs: list[RunInfo], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    logged = [r for r in runs if any(m in r.metrics for m in KL_BY_MODE)]
    if not logged:
        return None
    fig, axes = plt.subplots(1, len(KL_BY_MODE), figsize=(6 * len(KL_BY_MODE), 4), squeeze=False)
    for ax, metric in zip(axes[0], KL_BY_MODE, strict=True):
        for r in logged:
            history = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, metric))
            if history:
                ax.plot(*zip(*history, strict=True), label=r.name, marker="." if len(history) < 30 else None)
        ax.set(title=metric, xlabel="step", ylabel="KL (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_accuracy(runs: list[RunInfo], path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    import numpy as np

    logged = [r for r in runs if any(m in r.metrics for m in ACCURACY)]
    if not logged:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(logged)), 4))
    x, width = np.arange(len(logged)), 0.8 / len(ACCURACY)
    for i, metric in enumerate(ACCURACY):
        values = [r.metrics.get(metric, np.nan) for r in logged]
        bars = ax.bar(x + (i - (len(ACCURACY) - 1) / 2) * width, values, width, label=metric.split("/")[1])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [r.name for r in logged], rotation=20, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="exact-match accuracy", title="accuracy per phase")
    ax.legend()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_curves(client, runs: list[RunInfo], path: Path) -> Path | None:
    """Dev accuracy per mode (columns) against steps and against FLOPs (rows), a line per run."""
    import matplotlib.pyplot as plt

    logged = [r for r in runs if any(m in r.metrics for m in DEV_ACCURACY)]
    if not logged:
        return None
    fig, axes = plt.subplots(2, len(DEV_ACCURACY), figsize=(6 * len(DEV_ACCURACY), 8), squeeze=False)
    for r in logged:
        flops = {m.step: m.value for m in client.get_metric_history(r.run_id, "dev/flops")}
        for col, metric in enumerate(DEV_ACCURACY):
            history = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, metric))
            if not history:
                continue
            steps, acc = zip(*history, strict=True)
            axes[0][col].plot(steps, acc, label=r.name, marker="o")
            if all(s in flops for s in steps):
                axes[1][col].plot([flops[s] for s in steps], acc, label=r.name, marker="o")
    for col, metric in enumerate(DEV_ACCURACY):
        for row, xlabel in enumerate(("step", "training FLOPs since the branch point")):
            ax = axes[row][col]
            ax.set(title=metric, xlabel=xlabel, ylabel="exact-match accuracy (greedy)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def compare(uri: str, run_ids: list[str], experiment: str | None, out: Path) -> tuple[str, list[Path]]:
    """Write the table and the plots into `out`; returns the table and the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    if bool(run_ids) == bool(experiment):
        raise ConfigError("compare: give run ids or --experiment NAME (one of them)")
    client = _client(uri)
    runs = find_runs(client, run_ids, experiment)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    files = [write_text_atomic(out / "runs.md", text)]
    files += [p for p in (plot_kl(client, runs, out / "kl_by_mode.png"),
                          plot_accuracy(runs, out / "accuracy.png"),
                          plot_curves(client, runs, out / "dev_curves.png")) if p is not None]
    log.info("compared %d runs: %s", len(runs), ", ".join(str(f) for f in files))
    return text, files
