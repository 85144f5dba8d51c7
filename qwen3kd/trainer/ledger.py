"""The compute each training step spends, logged with its metrics so that arms and phases can be
compared at equal cost (the Qwen3 report compares on-policy distillation and RL in GPU hours).

Analytic FLOPs, with N a model's active parameters (Kaplan et al. 2020; an MoE counts the experts
a token uses): 6N per token the student trains on (forward and backward; every position of a
row, prompt included), 2N_teacher per token the teacher scores (distillation objectives: the same
rows, forward only), 2N per token the student generates in its rollouts. Attention's own FLOPs
(∝ sequence length) are left out, as in those estimates; so are the weight sync's probe and
evaluation. Measured: CPU-seconds of every rank and its child processes (the rollout engine's
included), summed over ranks, and the step's wall-seconds (time/step).

Per step: compute/flops (and its parts compute/flops/train, /teacher, /rollout) and
compute/cpu_seconds; a phase's or run's total is the sum over its steps.
"""

from __future__ import annotations

import psutil
import torch
import torch.distributed as dist

from qwen3kd.config.schema import JobConfig


def cpu_seconds() -> float:
    """This process's CPU time with its children's, living (the engine) and ended."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


class Ledger:
    def __init__(self, cfg: JobConfig, dp: int, device: torch.device):
        from qwen3kd.models.params import count_params

        self.student = count_params(cfg.model).active
        self.teacher = count_params(cfg.teacher.model).active if cfg.teacher is not None else 0
        self.dp, self.device = dp, device
        self.cpu = cpu_seconds()

    def step(self, trained_tokens: int, scored: bool, generated_tokens: float) -> dict[str, float]:
        """This step's compute. trained_tokens: this replica's (every rank of a replica holds the
        same rows); scored: the teacher scored those rows; generated_tokens: already global."""
        now = cpu_seconds()
        # One all-reduce over every rank: the replica's token count once per rank of it (hence
        # the division by the ranks per replica), every rank's CPU time.
        sums = torch.tensor([float(trained_tokens), now - self.cpu], dtype=torch.float64,
                            device=self.device)
        dist.all_reduce(sums)
        self.cpu = now
        tokens, cpu = float(sums[0]) * self.dp / dist.get_world_size(), float(sums[1])
        train = 6.0 * self.student * tokens
        teacher = 2.0 * self.teacher * tokens if scored else 0.0
        rollout = 2.0 * self.student * generated_tokens
        return {"compute/flops": train + teacher + rollout, "compute/flops/train": train,
                "compute/flops/teacher": teacher, "compute/flops/rollout": rollout,
                "compute/cpu_seconds": cpu}
