"""A run past its deadline (train.exit_after_minutes from the job's start) stops at the first step
boundary with a complete checkpoint, exit code 75 and the stop file for the batch script; resumed
without the deadline it ends where an uninterrupted run ends, with the same losses. (SIGUSR1 and
SLURM's requeue: tests/slurm/test_slurm.py.)"""

from __future__ import annotations

import time

from helpers import SMOKE, last_checkpoint, qwen3kd

from qwen3kd.stop import EXIT_STOPPED
from qwen3kd.tracking import read_metrics


def test_the_deadline_stops_with_exit_code_75_and_a_checkpoint(toy_assets, tmp_path):
    a, run = toy_assets, tmp_path / "deadline"
    args = ["train", str(SMOKE / "offpolicy-tiny.yaml"), f"data.path={a / 'train.jsonl'}",
            f"data.eval_path={a / 'eval.jsonl'}", f"data.tokenizer={a / 'tokenizer'}",
            f"teacher.load={a / 'teacher'}", "parallel.tensor=1", "train.steps=3", "eval.interval=0",
            "tracking.enabled=false", "optim.warmup_steps=1"]
    # The job started a minute ago (as the SLURM script exports it): the deadline has passed.
    p = qwen3kd(*args, f"run.dir={run}", "train.exit_after_minutes=0.5", check=False,
                env={"QWEN3KD_JOB_START": str(time.time() - 60),
                     "QWEN3KD_STOP_FILE": str(tmp_path / "stopped")})
    assert p.returncode == EXIT_STOPPED, p.stderr[-3000:]
    assert "stopped at step 1 (train.exit_after_minutes reached)" in p.stderr
    assert (tmp_path / "stopped").read_text().startswith("stopped at step 1")
    assert last_checkpoint(run).name == "step_0000001"
    qwen3kd(*args, f"run.dir={run}", "resume=auto")
    qwen3kd(*args, f"run.dir={tmp_path / 'ref'}")
    loss = lambda d: {m["step"]: m["train/loss"] for m in read_metrics(d)}  # noqa: E731
    assert loss(run) == loss(tmp_path / "ref") and len(loss(run)) == 3
