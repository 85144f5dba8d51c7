"""Training checkpoints: student weights + optimizer + LR schedule + data position + RNG states.

    <checkpoint.dir>/step_0000300/   a Megatron distributed checkpoint (torch_dist):
        model ShardedTensors at global shapes (loadable at any TP / PP / EP), the optimizer state
        (the distributed optimizer's in the `fully_reshardable` format), and in common.pt the
        LR-schedule state and the data position;
        rng/rank00000.pt ...             each rank's python / numpy / torch / megatron RNG states
        hf/                              the student's Hugging Face files (config.json, tokenizer,
                                         generation_config.json) when it started from one
        qwen3kd.json                     written last: step, world size, the model's architecture

A save is written to `step_N.tmp` and renamed once every rank has finished, so a directory named
`step_N` is always complete and an interrupted save is never taken as the latest. Only the
student is saved: a teacher is rebuilt from its own (read-only) checkpoint.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qwen3kd import faults
from qwen3kd.checkpoint.dcp import SyncSave
from qwen3kd.checkpoint.hf import copy_hf_files
from qwen3kd.checkpoint.manifest import check_model, read_manifest, write_manifest
from qwen3kd.checkpoint.weights import model_sharded_state
from qwen3kd.config.schema import ModelConfig
from qwen3kd.errors import DataError

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d+)$")
# Reshardable at any TP / PP / DP on resume; the other formats fix TP and PP (or fail on CPU).
_DISTOPT = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # the data position: sequences consumed so far (all DP ranks)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete step checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and read_manifest(p) is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _sharded_state(model: list, optimizer, is_loading: bool) -> dict:
    state = model_sharded_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=_DISTOPT)
    return state


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(), "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save(root: Path, progress: Progress, model: list, optimizer, scheduler, model_cfg: ModelConfig,
         keep_last: int, hf_source: Path | None = None) -> Path:
    """Write step checkpoint `progress.step` under `root` (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier, interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    state["progress"] = asdict(progress)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=SyncSave())
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    faults.maybe_kill("during_checkpoint", progress.step)
    dist.barrier()
    if rank == 0:
        if hf_source is not None:
            copy_hf_files(hf_source, tmp / "hf")
        write_manifest(tmp, "training", model_cfg, step=progress.step,
                       world_size=dist.get_world_size())
        if final.exists():  # the same step saved again (e.g. a rerun): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep_last)
    dist.barrier()
    log.info("saved checkpoint %s", final)
    faults.maybe_kill("after_checkpoint", progress.step)
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load(path: Path, model: list, optimizer, scheduler, model_cfg: ModelConfig) -> Progress:
    """Restore everything `save` wrote (collective). Returns the data position to continue from."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    path = Path(path)
    manifest = check_model(path, model_cfg)
    if manifest is None or manifest.get("kind") != "training":
        raise DataError(f"resume: {path} is not a qwen3kd training checkpoint (no {path}/qwen3kd.json "
                        "of kind 'training')")
    state = _sharded_state(model, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, str(path))
    for i, m in enumerate(model):
        unwrap_model(m).load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    # The schedule comes from the config (so a run can be extended or re-tuned); its position from
    # here. Megatron's scheduler reads the peak and floor rates from each parameter group, which
    # the optimizer state just restored from the checkpoint: without this a changed optim.lr or
    # optim.min_lr would be silently ignored on resume.
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    scheduler.load_state_dict(loaded["scheduler"])  # also sets each group's lr for the position
    rng = path / "rng" / f"rank{dist.get_rank():05d}.pt"
    if manifest.get("world_size") == dist.get_world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("resume: world size changed (%s → %d): RNG states start from the seed",
                    manifest.get("world_size"), dist.get_world_size())
    return Progress(**loaded["progress"])
