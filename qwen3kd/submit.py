"""`qwen3kd submit`: check a job before it is queued, then hand it to sbatch with
launch/slurm/qwen3kd.sbatch, printing the command it runs.

What is checked here rather than on the cluster: the config validates (keys, layouts, paths: the
submit host sees the cluster's shared file system) and its world size is the job's, nodes ×
processes per node. A job that would fail in its first second should not wait in the queue first.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from qwen3kd.errors import ConfigError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "qwen3kd.sbatch"
COMMANDS = ("train", "generate", "eval")


def sbatch_command(command: str, config: str, overrides: list[str], nodes: int,
                   sbatch_args: list[str]) -> list[str]:
    return ["sbatch", "-N", str(nodes), *sbatch_args, str(SBATCH), command, config, *overrides]


def submit(command: str, config: str, overrides: list[str], nodes: int, nproc: int,
           sbatch_args: list[str], dry_run: bool) -> int:
    from qwen3kd.config.loader import load_config
    from qwen3kd.config.validate import validate

    if command not in COMMANDS:
        raise ConfigError(f"--command {command}: expected one of {', '.join(COMMANDS)}")
    if nodes < 1 or nproc < 1:
        raise ConfigError("--nodes and --nproc-per-node must be >= 1")
    world = nodes * nproc
    # Validate as the job's ranks will: with its world size (a parallel.world_size that differs
    # is an error naming both).
    os.environ["WORLD_SIZE"] = str(world)
    try:
        validate(load_config(config, overrides), world_size=world)
    except ConfigError as e:
        raise ConfigError(f"{e} (the job: --nodes {nodes} × --nproc-per-node {nproc})") from None
    cmd = sbatch_command(command, config, overrides, nodes, sbatch_args)
    # SLURM runs a copy of the script: where the checkout is, it learns from QWEN3KD_ROOT.
    env = {"NPROC_PER_NODE": str(nproc), "QWEN3KD_ROOT": str(ROOT)}
    sys.stdout.write(" ".join(f"{k}={v}" for k, v in env.items()) + f" {shlex.join(cmd)}\n")
    if dry_run:
        return 0
    p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if p.returncode:
        raise ConfigError(f"sbatch refused the job: {p.stderr.strip() or p.stdout.strip()}")
    sys.stdout.write(p.stdout)
    return 0
