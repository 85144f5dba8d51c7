"""Model weights as a Megatron distributed checkpoint (torch_dist format).

Each ShardedTensor is stored under its global key with its global shape, so a checkpoint saved at
one TP / PP / EP layout loads at any other (megatron's dist_checkpointing reshards on load).
Saves go to a temporary directory renamed into place: an interrupted save never looks finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def _sharded(chunks: list[torch.nn.Module]) -> dict:
    from megatron.core.utils import unwrap_model

    return {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_weights(chunks: list[torch.nn.Module], path: Path) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(chunks), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    dist.barrier()


def load_weights(chunks: list[torch.nn.Module], path: Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    state = dist_checkpointing.load(_sharded(chunks), str(path))
    for i, c in enumerate(chunks):
        unwrap_model(c).load_state_dict(state[f"model{i}"], strict=True)


def load_initial_weights(chunks: list[torch.nn.Module], path: Path, model) -> None:
    """`checkpoint.load`: a Hugging Face folder (has config.json; read directly, no conversion
    step) or a Megatron distributed checkpoint, at any layout."""
    if (Path(path) / "config.json").is_file():
        from qwen3kd.checkpoint.hf import HFCheckpoint, load_hf_into

        load_hf_into(chunks, HFCheckpoint(path), model)
    else:
        load_weights(chunks, path)
