"""Initial weights for a model: a Hugging Face folder or a Megatron distributed checkpoint.

Megatron checkpoints (torch_dist format) store each ShardedTensor under its global key with its
global shape, so one saved at any TP / PP / EP layout loads at any other: megatron's
dist_checkpointing reads each rank's slices. Optimizer state in a training checkpoint is ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3kd.checkpoint.manifest import check_model
from qwen3kd.config.schema import ModelConfig
from qwen3kd.errors import DataError


def model_sharded_state(chunks: list[torch.nn.Module]) -> dict:
    """The model chunks' megatron sharded state dict, one entry per (virtual pipeline) chunk.
    Replica ids come from the model's own data-parallel group: megatron would take the global
    one, which for a teacher at its own layout gives wrong replicas (one rank then raised
    "Invalid access pattern" while another hung in DCP's gather)."""
    from megatron.core.utils import unwrap_model

    out = {}
    for i, c in enumerate(chunks):
        gpt = unwrap_model(c)
        out[f"model{i}"] = gpt.sharded_state_dict(metadata={"dp_cp_group": gpt.pg_collection.dp_cp})
    return out


def load_weights(chunks: list[torch.nn.Module], path: Path, model: ModelConfig) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.utils import unwrap_model

    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise DataError(f"{path}: not a Megatron distributed checkpoint (no metadata.json) and "
                        "not a Hugging Face folder (no config.json)")
    check_model(path, model)
    sharded = model_sharded_state(chunks)
    try:
        state = dist_checkpointing.load(sharded, str(path))
    except (CheckpointingException, KeyError) as e:
        raise DataError(f"{path}: does not fit the model '{model.name}': {e}") from None
    for i, c in enumerate(chunks):
        unwrap_model(c).load_state_dict(state[f"model{i}"], strict=True)


def load_initial_weights(chunks: list[torch.nn.Module], path: Path, model: ModelConfig) -> None:
    """`checkpoint.load`: a Hugging Face folder (has config.json; read directly, no conversion
    step) or a Megatron distributed checkpoint, at any layout."""
    if (Path(path) / "config.json").is_file():
        from qwen3kd.checkpoint.hf import HFCheckpoint, load_hf_into

        load_hf_into(chunks, HFCheckpoint(path), model)
    else:
        load_weights(chunks, path, model)


def check_fits(path: Path, model: ModelConfig) -> None:
    """Raise DataError, naming the file, unless `path` holds weights of `model`'s architecture (a
    Hugging Face folder's config.json or a qwen3kd Megatron checkpoint's manifest). Reads only
    metadata: callers run it on every rank before any collective, so all ranks fail alike."""
    path = Path(path)
    if (path / "config.json").is_file():
        from qwen3kd.checkpoint.hf import HFCheckpoint, arch_fields
        from qwen3kd.checkpoint.manifest import differences

        ckpt = HFCheckpoint(path)
        diffs = differences(model, arch_fields(ckpt.config), "config.json")
        if diffs:
            raise DataError(f"{path}/config.json does not match the model config: " + "; ".join(diffs))
        missing = ckpt.missing_files()
        if missing:
            raise DataError(f"{missing[0]}: shard file missing")
        return
    if not (path / "metadata.json").is_file():
        raise DataError(f"{path}: not a Megatron distributed checkpoint (no metadata.json) and "
                        "not a Hugging Face folder (no config.json)")
    check_model(path, model)


def hf_files_of(path: Path) -> Path | None:
    """Where the Hugging Face non-weight files (config, tokenizer) of a checkpoint are, if any:
    the folder itself for a Hugging Face folder, its `hf/` for one qwen3kd wrote."""
    path = Path(path)
    for candidate in (path, path / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    return None
