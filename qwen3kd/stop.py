"""Stopping early on purpose: a preemption warning (SIGUSR1, which the SLURM batch script forwards
before the wall-clock limit or a preemption) or a deadline (`train.exit_after_minutes` from the
job's start) makes a run save a complete checkpoint at the next loop boundary and exit with
EXIT_STOPPED, which the batch script turns into a requeue; the rerun resumes with resume=auto.

Why a flag every rank agrees on: the signal reaches ranks at different moments (or only some of
them); a rank that stopped alone would leave the others waiting in the next collective. So each
boundary (a training step with its evaluation and on-policy rollouts, a `generate` shard) ends
with one all-reduce (MAX) of the local flag, and all ranks stop at the same step or none does.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on purpose, checkpoint complete: requeue and resume
# The job's start (epoch seconds), exported by launch/slurm/qwen3kd.sbatch; else this process's.
JOB_START_ENV = "QWEN3KD_JOB_START"
# Where a stopped run says so for the batch script (torch.distributed.run reports every non-zero
# exit of its ranks as 1, so the exit code alone does not reach it).
STOP_FILE_ENV = "QWEN3KD_STOP_FILE"
_START = time.time()


class StopRequested(Exception):
    """Raised at a loop boundary once every rank agreed to stop; its checkpoint is complete."""


class StopSignal:
    def __init__(self, exit_after_minutes: float | None = None):
        self.requested: str | None = None
        start = float(os.environ.get(JOB_START_ENV) or _START)
        self.deadline = start + 60 * exit_after_minutes if exit_after_minutes else None
        # Handlers can only be installed from the main thread (tests drive trainers from others).
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:
            log.warning("not the main thread: SIGUSR1 will not stop this run early")

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the handler runs between bytecodes, possibly inside a collective.
        self.requested = "SIGUSR1"

    def local(self) -> str | None:
        """Why this process wants to stop, if it does."""
        if self.requested is None and self.deadline is not None and time.time() >= self.deadline:
            self.requested = "train.exit_after_minutes reached"
        return self.requested

    def agreed(self) -> bool:
        """True on every rank if any rank wants to stop (one all-reduce: call it at the same
        boundary on every rank)."""
        import torch
        import torch.distributed as dist

        from qwen3kd.trainer.objectives import device

        flag = torch.tensor([1.0 if self.local() else 0.0], device=device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def mark_stopped(message: str) -> None:
    """Tell the batch script (QWEN3KD_STOP_FILE, if set) that the run stopped on purpose."""
    path = os.environ.get(STOP_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":  # every rank stopped at the same step
        from pathlib import Path

        from qwen3kd.files import write_text_atomic

        write_text_atomic(Path(path), message + "\n")
