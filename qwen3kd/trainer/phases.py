"""The run's phases in order (config `phases`) and their step ranges: off-policy steps are
train.steps, on-policy steps are onpolicy.steps; the step counter, the optimizer and the LR
schedule run on across phases, and each phase hands its weights (and a checkpoint) to the next."""

from __future__ import annotations

from qwen3kd.config.schema import JobConfig, KDConfig, Phase


def phase_plan(cfg: JobConfig) -> list[tuple[Phase, int, int]]:
    """[(phase, first step (exclusive), last step)] in order; a run without a teacher is one
    off-policy-like phase of plain cross-entropy."""
    plan, step = [], 0
    for phase in (cfg.phases if cfg.teacher is not None else [Phase.offpolicy]):
        n = cfg.train.steps if phase is Phase.offpolicy else cfg.onpolicy.steps
        plan.append((phase, step, step + n))
        step += n
    return plan


def total_steps(cfg: JobConfig) -> int:
    return phase_plan(cfg)[-1][2]


def onpolicy_kd(cfg: JobConfig) -> KDConfig:
    """The on-policy loss: onpolicy.kd_kind at T = 1 (the teacher's plain distribution, whatever
    the rollout temperature), no cross-entropy (the student's own tokens are no reference)."""
    k = cfg.kd
    return KDConfig(kind=cfg.onpolicy.kd_kind, temperature=1.0, alpha=1.0, beta=k.beta,
                    skew=k.skew, chunk=k.chunk, topk=k.topk)
