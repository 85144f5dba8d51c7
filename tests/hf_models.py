"""Tiny random Qwen3 / Qwen3-MoE models built with transformers (the oracle) and saved to disk."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen3kd.config.schema import ModelConfig


def save_tiny_hf(model: ModelConfig, out: Path, seed: int = 0, shard_size: str = "40KB",
                 dtype: torch.dtype = torch.float32) -> Path:
    """Save a random transformers model with `model`'s architecture, in several safetensors
    shards, with small stand-in tokenizer files (to check they travel unchanged)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size, num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_key_value_heads,
        head_dim=model.head_dim, max_position_embeddings=model.max_position_embeddings,
        rope_theta=model.rope_theta, rms_norm_eps=model.rms_norm_eps,
        tie_word_embeddings=model.tie_word_embeddings, attention_bias=False,
    )
    torch.manual_seed(seed)
    if model.num_experts:
        cfg = Qwen3MoeConfig(**common, num_experts=model.num_experts,
                             num_experts_per_tok=model.num_experts_per_tok,
                             moe_intermediate_size=model.moe_intermediate_size,
                             norm_topk_prob=model.norm_topk_prob, decoder_sparse_step=1,
                             mlp_only_layers=[])
        hf = Qwen3MoeForCausalLM(cfg)
    else:
        hf = Qwen3ForCausalLM(Qwen3Config(**common))
    # Random init with norms away from 1, so a swapped or missing norm weight shows in the logits.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    hf.to(dtype).save_pretrained(out, max_shard_size=shard_size)
    (Path(out) / "tokenizer_config.json").write_text('{"model_max_length": 512, "note": "stand-in"}\n')
    (Path(out) / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n")
    return Path(out)


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits
