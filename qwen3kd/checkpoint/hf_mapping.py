"""Hugging Face ↔ Megatron names for Qwen3 and Qwen3-MoE: one declarative table per architecture.

Each row maps a megatron-core parameter (local or TE layer spec; `*` = global layer index,
`E` = global expert index) to the Hugging Face tensors it is made of, how they merge (`copy`,
`qkv`: grouped-query interleave, `gate_up`: SwiGLU concatenation) and how the merged tensor is
split over tensor-parallel ranks (`replicated`, `column`: dim 0, `row`: dim 1, `swiglu`: gate and
up halves split separately). Names of the Hugging Face side are those of the saved checkpoint
(transformers 5.x writes MoE experts per expert on disk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    megatron: str  # pattern over megatron parameter names
    hf: tuple[str, ...]  # Hugging Face tensor names (same placeholders)
    merge: str = "copy"  # copy | qkv | gate_up
    shard: str = "replicated"  # replicated | column | row | swiglu

    def regex(self) -> re.Pattern:
        pat = re.escape(self.megatron).replace(r"\*", r"(?P<layer>\d+)").replace("E", r"(?P<expert>\d+)")
        return re.compile(pat + "$")

    def hf_names(self, layer: int | None, expert: int | None) -> list[str]:
        return [n.replace("*", str(layer)).replace("E", str(expert)) for n in self.hf]


_L = "decoder.layers.*."
_H = "model.layers.*."
COMMON = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), shard="column"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), shard="column"),
    Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    Rule(_L + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",)),
    Rule(_L + "self_attention.linear_qkv.weight",
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
         merge="qkv", shard="column"),
    Rule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",)),
    Rule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",)),
    Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), shard="row"),
    Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
    Rule(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",)),
)
QWEN3 = COMMON + (
    Rule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
         merge="gate_up", shard="swiglu"),
    Rule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), shard="row"),
)
QWEN3_MOE = COMMON + (
    Rule(_L + "mlp.router.weight", (_H + "mlp.gate.weight",)),
    Rule(_L + "mlp.experts.local_experts.E.linear_fc1.weight",
         (_H + "mlp.experts.E.gate_proj.weight", _H + "mlp.experts.E.up_proj.weight"),
         merge="gate_up", shard="swiglu"),
    Rule(_L + "mlp.experts.local_experts.E.linear_fc2.weight",
         (_H + "mlp.experts.E.down_proj.weight",), shard="row"),
)
TABLES = {"Qwen3ForCausalLM": QWEN3, "Qwen3MoeForCausalLM": QWEN3_MOE}


@dataclass(frozen=True)
class Heads:
    """What the `qkv` merge needs: attention heads, KV heads (query groups), head dim."""

    heads: int
    groups: int
    dim: int


def merge(kind: str, tensors: list[torch.Tensor], heads: Heads) -> torch.Tensor:
    """HF tensors → one megatron tensor (global, unsharded)."""
    if kind == "copy":
        return tensors[0]
    if kind == "gate_up":
        return torch.cat(tensors, dim=0)  # [2F, H]: gate rows, then up rows
    if kind == "qkv":
        q, k, v = tensors
        per = heads.heads // heads.groups
        hidden = q.shape[-1]
        # Megatron stores, for each query group: its `per` query heads, then its k head, its v head.
        q = q.view(heads.groups, per * heads.dim, hidden)
        k = k.view(heads.groups, heads.dim, hidden)
        v = v.view(heads.groups, heads.dim, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)
    raise ValueError(f"unknown merge kind {kind!r}")


def split(kind: str, tensor: torch.Tensor, heads: Heads) -> list[torch.Tensor]:
    """One megatron tensor (global) → its HF tensors; the inverse of `merge`."""
    if kind == "copy":
        return [tensor]
    if kind == "gate_up":
        return list(tensor.chunk(2, dim=0))
    if kind == "qkv":
        per = heads.heads // heads.groups
        hidden = tensor.shape[-1]
        g = tensor.view(heads.groups, (per + 2) * heads.dim, hidden)
        q, k, v = g.split([per * heads.dim, heads.dim, heads.dim], dim=1)
        return [q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)]
    raise ValueError(f"unknown merge kind {kind!r}")


def shard(kind: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The slice of a global megatron tensor that tensor-parallel rank `rank` of `size` holds."""
    if size == 1 or kind == "replicated":
        return tensor
    if kind == "column":
        return tensor.chunk(size, dim=0)[rank]
    if kind == "row":
        return tensor.chunk(size, dim=1)[rank]
    if kind == "swiglu":  # each rank holds [its gate rows; its up rows]
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    raise ValueError(f"unknown shard kind {kind!r}")


def unshard(kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor from all tensor-parallel ranks' slices (in rank order); inverse of `shard`."""
    if len(parts) == 1 or kind == "replicated":
        return parts[0]
    if kind == "column":
        return torch.cat(parts, dim=0)
    if kind == "row":
        return torch.cat(parts, dim=1)
    if kind == "swiglu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown shard kind {kind!r}")


def find_rule(table: tuple[Rule, ...], name: str) -> tuple[Rule, int | None, int | None]:
    """The rule for megatron parameter `name` (with *global* layer / expert indices)."""
    for rule in table:
        m = rule.regex().match(name)
        if m:
            d = m.groupdict()
            layer = int(d["layer"]) if d.get("layer") is not None else None
            expert = int(d["expert"]) if d.get("expert") is not None else None
            return rule, layer, expert
    raise KeyError(f"no Hugging Face mapping for megatron parameter '{name}'")
