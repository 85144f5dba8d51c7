"""Logging set-up: rank 0 logs at INFO, other ranks only warnings (unless --debug)."""

from __future__ import annotations

import logging
import os
import warnings


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(debug: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.INFO if rank() == 0 else logging.WARNING)
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [r{rank()}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if not debug:
        # megatron-core warns on import that TE / Apex are absent: expected on CPU, said once here.
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
        logging.getLogger("megatron").setLevel(logging.WARNING)
