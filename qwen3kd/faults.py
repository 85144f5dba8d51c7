"""Fault injection for the crash-safety tests: `QWEN3KD_FAULT=POINT@STEP` makes every rank
SIGKILL itself when it reaches POINT at STEP, so a test can kill a real run at an exact moment.

Points: `after_checkpoint` (the step's checkpoint is complete), `during_checkpoint` (its data is
written but it was not renamed into place yet), `after_shard` (`qwen3kd generate`: shard STEP is
written; STEP is 0-based, the NNNNN of its file shard-NNNNN.jsonl), `prepare_chunk` (`qwen3kd
prepare`: chunk STEP (0-based) of the lines is written into its unfinished shard), `engine_dead`
(on-policy: the rollout engine's processes are killed before STEP's rollouts; the trainer lives
on and must stop cleanly). Unset in normal runs: then this does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


def armed(point: str, step: int) -> bool:
    return os.environ.get("QWEN3KD_FAULT") == f"{point}@{step}"


def maybe_kill(point: str, step: int, before: Callable[[], None] | None = None) -> None:
    """`before` runs first: e.g. to SIGKILL helper processes (a rollout engine's) that would
    otherwise outlive this one, where a real crash of the node would take them too."""
    if armed(point, step):
        log.warning("QWEN3KD_FAULT: killing this process at %s, step %d", point, step)
        if before is not None:
            before()
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
