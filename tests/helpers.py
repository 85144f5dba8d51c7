"""Run the real `qwen3kd` CLI in subprocesses (single process, or torchrun with gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: no oversubscription
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qwen3kd(*args: str, nproc: int = 1, timeout: int = 300, check: bool = True,
            env: dict[str, str] | None = None):
    """`qwen3kd ARGS` (nproc == 1) or `torchrun --nproc_per_node NPROC -m qwen3kd.cli ARGS`."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "qwen3kd.cli", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_port()}", "-m", "qwen3kd.cli", *args,
        ]
    p = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def last_checkpoint(run_dir: Path) -> Path:
    """The newest complete training checkpoint of a run."""
    from qwen3kd.checkpoint.training import latest

    found = latest(Path(run_dir) / "checkpoints")
    assert found is not None, f"no checkpoint under {run_dir}/checkpoints"
    return found


def global_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """A Megatron dist checkpoint's model weights as {global key: full tensor}, read with torch
    DCP alone (optimizer state left out)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / (ckpt.name + ".pt")
    if not out.exists():
        dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and "optimizer." not in k}

