"""A job's tracking: metrics.jsonl and, on rank 0, an MLflow run with the resolved config as
params, lineage tags (what was distilled into what, with which tokenizer and template) and the
config as an artifact."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from qwen3kd.config.schema import JobConfig, Phase
from qwen3kd.tracking import JsonlMetrics, MetricsLogger, NullMetrics

log = logging.getLogger(__name__)


class Tee:
    """Every call goes to each logger in turn."""

    def __init__(self, *loggers: MetricsLogger):
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        for lg in self.loggers:
            lg.log_artifact(path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        for lg in self.loggers:
            lg.close(status)


def lineage_tags(cfg: JobConfig, data) -> dict[str, str]:
    from qwen3kd.tracking.lineage import checkpoint_fingerprint, text_hash, vocab_hash

    def fingerprint(path: str | None) -> str:
        return checkpoint_fingerprint(Path(path)) if path else "random-init"

    tags = {"qwen3kd.student": cfg.model.name,
            "lineage.student_checkpoint": fingerprint(cfg.checkpoint.load)}
    if cfg.resume != "never":
        tags["qwen3kd.resume"] = cfg.resume
    if cfg.teacher is not None:
        tags.update({
            "qwen3kd.teacher": cfg.teacher.model.name,
            "lineage.teacher_checkpoint": fingerprint(cfg.teacher.load),
            "kd.kind": cfg.kd.kind.value, "kd.temperature": str(cfg.kd.temperature),
            "kd.alpha": str(cfg.kd.alpha), "kd.topk": str(cfg.kd.topk),
        })
        if Phase.onpolicy in cfg.phases:
            from qwen3kd.trainer.phases import onpolicy_kd

            # DESIGN.md: say at which temperature the teacher scores the student's samples.
            k = onpolicy_kd(cfg)
            tags.update({"onpolicy.kd_kind": k.kind.value, "onpolicy.kd_temperature": str(k.temperature),
                         "onpolicy.rollout_temperature": str(cfg.rollout.temperature)})
    if data.tokenizer is not None:
        tags["lineage.tokenizer"] = vocab_hash(data.tokenizer.get_vocab())
        tags["lineage.chat_template"] = text_hash(data.tokenizer.chat_template or "")
    return tags


def open_tracking(cfg: JobConfig, data, is_rank0: bool, resume_step: int) -> MetricsLogger:
    if not is_rank0:
        return NullMetrics()
    run_dir = Path(cfg.run.dir)
    local = JsonlMetrics(run_dir, resume_step=resume_step)
    t = cfg.tracking
    if not t.enabled:
        return local
    from qwen3kd.tracking.lineage import flatten
    from qwen3kd.tracking.mlflow_run import MlflowRun

    params = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    tags = {**lineage_tags(cfg, data), **t.tags}
    if t.parent_run_id:
        tags["mlflow.parentRunId"] = t.parent_run_id  # MLflow's own nesting tag
    run = MlflowRun.start(t.uri, t.experiment, run_dir, cfg.run.name, params, tags, t.timeout_s)
    config = run_dir / "config.yaml"
    if config.is_file():
        run.log_artifact(config)
    return Tee(local, run)
