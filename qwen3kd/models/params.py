"""Parameter counts of a Qwen3 preset, from the config alone (no tensors).

Used by `qwen3kd train --dry-run` to size the 235B preset on a laptop; a test checks the formula
against the parameters of a real megatron GPTModel built from the tiny presets.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen3kd.config.schema import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int  # unique parameters (a tied lm_head counted once)
    embedding: int  # input embedding + untied lm_head
    active: int  # parameters used per token (MoE: only the routed experts)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def count_params(m: ModelConfig) -> ParamCount:
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_key_value_heads * d
    attn = h * (q + 2 * kv) + q * h + (2 * d if m.qk_norm else 0)
    norms = 2 * h  # input_layernorm + post_attention_layernorm
    if m.num_experts:
        expert = 3 * h * m.moe_intermediate_size
        mlp_total = m.num_experts * expert + h * m.num_experts  # experts + router
        mlp_active = m.num_experts_per_tok * expert + h * m.num_experts
    else:
        mlp_total = mlp_active = 3 * h * m.intermediate_size
    embed = m.vocab_size * h * (1 if m.tie_word_embeddings else 2)
    layers = m.num_hidden_layers
    final_norm = h
    total = layers * (attn + norms + mlp_total) + final_norm + embed
    active = layers * (attn + norms + mlp_active) + final_norm + embed
    return ParamCount(total=total, embedding=embed, active=active)


def per_stage_params(m: ModelConfig, pp: int, first: int | None, last: int | None) -> list[int]:
    """Unique parameters held by each pipeline stage (before tensor / expert sharding)."""
    c = count_params(m)
    layer = (c.total - c.embedding - m.hidden_size) // m.num_hidden_layers
    layers = _stage_layers(m.num_hidden_layers, pp, first, last)
    embed = m.vocab_size * m.hidden_size
    out = [n * layer for n in layers]
    out[0] += embed
    out[-1] += m.hidden_size + (embed if not m.tie_word_embeddings or pp > 1 else 0)
    return out


def _stage_layers(layers: int, pp: int, first: int | None, last: int | None) -> list[int]:
    if pp == 1:
        return [layers]
    rest, middle = layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
    even = [rest // middle] * middle if middle else []
    return ([first] if first is not None else []) + even + ([last] if last is not None else [])


def rank_params(m: ModelConfig, layout, rank: int, first: int | None = None,
                last: int | None = None, output_layer: bool = True) -> int:
    """Parameters one rank holds under `layout` (a ParallelLayout): its stage's layers with the
    attention and dense MLP split by TP and the experts by EP × expert-TP (norms and the router
    replicated), the embedding on the first stage and the output layer on the last (split by TP).
    `output_layer=False`: a model that keeps no output layer of its own (the teacher)."""
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_key_value_heads * d
    c = layout.coords(rank)
    layers = _stage_layers(m.num_hidden_layers, layout.pp, first, last)[c["pp"]]
    layer = (h * (q + 2 * kv) + q * h) // layout.tp + (2 * d if m.qk_norm else 0) + 2 * h
    if m.num_experts:
        layer += m.num_experts * 3 * h * m.moe_intermediate_size // (layout.ep * layout.etp)
        layer += h * m.num_experts
    else:
        layer += 3 * h * m.intermediate_size // layout.tp
    total = layers * layer
    first_stage, last_stage = c["pp"] == 0, c["pp"] == layout.pp - 1
    if first_stage:
        total += m.vocab_size * h // layout.tp
    if last_stage:
        total += h
        if output_layer and not (m.tie_word_embeddings and first_stage):
            total += m.vocab_size * h // layout.tp
    return total
