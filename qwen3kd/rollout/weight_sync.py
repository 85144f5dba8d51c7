"""The student's weights as full Hugging Face tensors, gathered from its TP / EP / PP shards onto
the first rank of its data-parallel replica (the rank that holds the rollout engine).

Every rank of the replica runs `hf_weights` (it drives collectives); it yields on the first rank
only, one tensor at a time, so the engine can take them as they come and nothing is written to
disk. Names come from the same declarative table as the checkpoint converter (hf_mapping.py):
tensor-parallel slices are concatenated back (`unshard`), fused tensors split (`split`: QKV,
gate/up), experts collected over the expert-parallel group, and later pipeline stages send theirs
to the first stage over the pipeline group.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from qwen3kd.checkpoint.hf import _global_name
from qwen3kd.checkpoint.hf_mapping import TABLES, Heads, find_rule, split, unshard
from qwen3kd.config.schema import ModelConfig


def _all_gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _stage_tensors(chunks: list, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """This pipeline stage's parameters as HF tensors; yields on its TP-rank-0 ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    table = TABLES["Qwen3MoeForCausalLM" if model.num_experts else "Qwen3ForCausalLM"]
    heads = Heads(model.num_attention_heads, model.num_key_value_heads, model.head_dim)
    tp, ep = ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        for local, param in chunk.named_parameters():
            name, is_expert = _global_name(chunk, local)
            rule, layer, expert = find_rule(table, name)
            if model.tie_word_embeddings and rule.hf == ("lm_head.weight",):
                continue  # the last stage's copy of the embedding, sent with the embedding
            data = param.detach()
            if is_expert:
                size, group = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_group()
            else:
                size, group = tp, ps.get_tensor_model_parallel_group()
            if size > 1 and rule.shard != "replicated":
                data = unshard(rule.shard, _all_gather(data, group, size))
            experts = [(expert, data)]
            if is_expert and ep > 1:  # rank r holds experts r·E/ep … : the same local index on each
                per = model.num_experts // ep
                local_index = expert - ps.get_expert_model_parallel_rank() * per
                parts = _all_gather(data, ps.get_expert_model_parallel_group(), ep)
                experts = [(r * per + local_index, p) for r, p in enumerate(parts)]
            if ps.get_tensor_model_parallel_rank() != 0:
                continue
            for e, full in experts:
                for hf_name, t in zip(rule.hf_names(layer, e), split(rule.merge, full, heads), strict=True):
                    yield hf_name, t
                    if model.tie_word_embeddings and hf_name == "model.embed_tokens.weight":
                        # vLLM 0.32's in-place reload does not refill a tied lm_head from the
                        # embedding ("ParallelLMHead: Failed to load weights"; the staleness probe
                        # measured a 0.3 log-prob gap): send it explicitly.
                        yield "lm_head.weight", t.clone()  # own storage (safetensors)


def hf_weights(chunks: list, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """All of the student's weights, HF names, on the replica's first rank (TP 0, PP 0);
    other ranks yield nothing but must exhaust the iterator too."""
    from megatron.core import parallel_state as ps

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    # Experts are all-gathered over the expert-parallel group, so every TP-rank-0 rank of the
    # first stage (the first rank of its data-parallel replica) has the whole model.
    first = ps.get_tensor_model_parallel_rank() == 0
    if pp == 1:
        for item in _stage_tensors(chunks, model):
            if first:
                yield item
        return
    group = ps.get_pipeline_model_parallel_group()
    if stage == 0:
        for item in _stage_tensors(chunks, model):
            if first:
                yield item
    else:
        mine = list(_stage_tensors(chunks, model))  # this stage's share (TP rank 0 only)
    # Later stages, in order, hand their tensors to stage 0 over the pipeline group (TP rank 0's).
    for s in range(1, pp):
        if not first:
            continue
        if stage == s:
            meta = [[(n, tuple(t.shape), t.dtype) for n, t in mine]]
            dist.send_object_list(meta, group=group, group_dst=0)
            for _, t in mine:
                dist.send(t.contiguous(), group=group, group_dst=0)
        elif stage == 0:
            meta = [None]
            dist.recv_object_list(meta, group=group, group_src=s)
            for n, shape, dtype in meta[0]:
                t = torch.empty(shape, dtype=dtype, device=_device())
                dist.recv(t, group=group, group_src=s)
                yield n, t


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
