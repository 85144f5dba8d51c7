"""The teacher's output layer, held on the student's last pipeline stage and split by the
*student's* tensor parallelism: the fused KD loss multiplies the teacher's final hidden states by
it chunk by chunk, vocabulary-parallel over the student's TP group, so the teacher's logits never
exist in full and the loss stays exact over the whole vocabulary whatever the teacher's layout.

A plain tensor [V / TP_student, H_teacher]: no gradient, in no optimizer, in no checkpoint. Read
from the teacher's Hugging Face folder (lm_head, or the embedding when tied) or Megatron
checkpoint (output_layer, or the word embeddings when tied), this rank's rows only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3kd.config.schema import ModelConfig
from qwen3kd.errors import DataError


def load_head(path: Path, model: ModelConfig, tp_rank: int, tp: int, dtype) -> torch.Tensor:
    """Rows [tp_rank·V/TP, (tp_rank+1)·V/TP) of the teacher's output layer."""
    v, h = model.vocab_size, model.hidden_size
    lo, hi = tp_rank * v // tp, (tp_rank + 1) * v // tp
    if (Path(path) / "config.json").is_file():
        from qwen3kd.checkpoint.hf import HFCheckpoint

        ckpt = HFCheckpoint(path)
        name = "lm_head.weight"
        if model.tie_word_embeddings or name not in ckpt.weight_map:
            name = "model.embed_tokens.weight"
        if ckpt.shape(name) != (v, h):
            raise DataError(f"{path}: tensor {name} has shape {ckpt.shape(name)}, the teacher "
                            f"preset '{model.name}' expects ({v}, {h})")
        rows = ckpt.get_rows(name, lo, hi)
        ckpt.close()
        return rows.to(dtype).contiguous()
    from megatron.core.dist_checkpointing import ShardedTensor

    from qwen3kd.checkpoint.dcp import read_regions

    key = "embedding.word_embeddings.weight" if model.tie_word_embeddings else "output_layer.weight"
    out = torch.empty(hi - lo, h, dtype=dtype)
    try:
        read_regions(Path(path), [ShardedTensor.from_rank_offsets(key, out, (0, tp_rank, tp))])
    except Exception as e:  # a missing key or a shape that does not fit, from torch DCP
        raise DataError(f"{path}: cannot read the teacher's {key} rows {lo}..{hi}: {e}") from None
    return out


class TeacherHead:
    """The copy on one student rank, and where it lives: on the device only while the student's
    forward-backward needs it (with teacher.offload), in host memory otherwise."""

    def __init__(self, weight: torch.Tensor, offload: bool):
        self.weight, self.offload_enabled = weight, offload and torch.cuda.is_available()
        if torch.cuda.is_available() and not self.offload_enabled:
            self.weight = self.weight.cuda()
        elif self.offload_enabled:
            self.weight = self.weight.pin_memory()

    def onload(self) -> None:
        if self.offload_enabled:
            self.host = self.weight
            self.weight = self.weight.to(torch.cuda.current_device(), non_blocking=True)

    def offload(self) -> None:
        if self.offload_enabled:
            self.weight = self.host
