"""`qwen3kd.json`: what a checkpoint directory written by qwen3kd holds, and for which model.

Every Megatron checkpoint qwen3kd writes (`convert --to megatron`, training checkpoints) carries
one, written last: loading it into a different model is a clear error naming the fields, not a
shape mismatch deep inside megatron.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen3kd.config.schema import ModelConfig
from qwen3kd.errors import DataError
from qwen3kd.files import write_text_atomic

MANIFEST = "qwen3kd.json"
FORMAT = 1
# The architecture: config.json fields (Hugging Face names) that decide every tensor's shape.
ARCH_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
    "rms_norm_eps", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "norm_topk_prob",
)


def architecture(model: ModelConfig) -> dict:
    return {k: getattr(model, k) for k in ARCH_FIELDS}


def differences(model: ModelConfig, other: dict, other_name: str, ours: str = "config") -> list[str]:
    """Architecture fields where `model` and a config dict disagree, one line each."""
    out = []
    for key in ARCH_FIELDS:
        if key not in other:
            continue
        mine, theirs = getattr(model, key), other[key]
        if isinstance(theirs, float) or isinstance(mine, float):
            same = abs(float(mine) - float(theirs)) <= 1e-12 * max(1.0, abs(float(theirs)))
        else:
            same = mine == theirs
        if not same:
            out.append(f"model.{key}: {ours} {mine!r}, {other_name} {theirs!r}")
    return out


def write_manifest(path: Path, kind: str, model: ModelConfig, **extra) -> None:
    """Written last into a checkpoint directory, atomically."""
    body = {"format": FORMAT, "kind": kind, "model_name": model.name,
            "architecture": architecture(model), **extra}
    write_text_atomic(Path(path) / MANIFEST, json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_manifest(path: Path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None


def check_model(path: Path, model: ModelConfig) -> dict | None:
    """Raise DataError if the checkpoint at `path` was written for another architecture."""
    manifest = read_manifest(path)
    if manifest is None:
        return None
    diffs = differences(model, manifest["architecture"], f"checkpoint ({manifest.get('model_name')})")
    if diffs:
        raise DataError(
            f"{path}: checkpoint is for another model than the config's '{model.name}': "
            + "; ".join(diffs)
        )
    return manifest
