"""Run the real `qwen3kd` CLI and the torchrun worker scripts in processes of their own (one, or
one per rank with gloo), started by tests/launcher.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from launcher import launch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: no oversubscription
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def qwen3kd(*args: str, nproc: int = 1, timeout: int = 300, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`qwen3kd ARGS` as one process, or as NPROC ranks as torchrun starts them (tests/launcher.py)."""
    return _checked(launch("qwen3kd.cli", list(args), {**_env(), **(env or {})}, nproc=nproc,
                           timeout=timeout)[0], check)


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """A worker script (tests/distributed/*_worker.py) as NPROC ranks, as torchrun starts them."""
    return _checked(launch(str(script), list(args), _env(), nproc=nproc, timeout=timeout)[0], check)


def _checked(p: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(p.args)} exited {p.returncode}\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-6000:]}")
    return p


def onpolicy_args(a: Path) -> list[str]:
    """The on-policy smoke config (2 off-policy steps, then on-policy steps 3..5) on the toy
    assets, at the layout of the SLURM jobs (one process on each of 2 nodes): the student at TP=2
    (one replica: one vLLM engine, on rank 0), the teacher at a layout of its own, TP=1 × DP=2."""
    return [str(SMOKE / "onpolicy-tiny.yaml"), *toy_overrides(a), "parallel.tensor=2",
            "teacher.parallel.tensor=1"]


def toy_overrides(a: Path) -> list[str]:
    """The overrides that point a smoke config at the toy assets (qwen3kd/toy.py)."""
    return [f"data.path={a / 'train.jsonl'}", f"data.eval_path={a / 'eval.jsonl'}",
            f"data.tokenizer={a / 'tokenizer'}", f"teacher.load={a / 'teacher'}",
            f"onpolicy.prompts={a / 'prompts.jsonl'}"]


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
