"""Fault injection for the crash-safety tests: `QWEN3KD_FAULT=POINT@STEP` makes every rank
SIGKILL itself when it reaches POINT at STEP, so a test can kill a real run at an exact moment.

Points: `after_checkpoint` (the step's checkpoint is complete), `during_checkpoint` (its data is
written but it was not renamed into place yet). Unset in normal runs: then this does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("QWEN3KD_FAULT") == f"{point}@{step}":
        log.warning("QWEN3KD_FAULT: killing this process at %s, step %d", point, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
