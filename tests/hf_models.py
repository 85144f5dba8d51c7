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


def save_scripted_qwen3(out: Path, tokenizer_dir: Path, chain: dict[str, str], scale: float = 30.0) -> dict[str, int]:
    """A 1-layer Qwen3 whose next token is a fixed function of the last token: `chain` maps token
    strings (e.g. "Ċ" → "<think>"). Attention and MLP outputs are zero (o_proj, down_proj), so the
    final hidden state is the last token's embedding; the output row of token j is the normalised
    embedding of the tokens that lead to j. The chosen token leads the others by about `scale` in
    logits: sampling at T = 1 follows the chain. Saved with the tokenizer; returns the ids."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {s: tok.convert_tokens_to_ids(s) for pair in chain.items() for s in pair}
    torch.manual_seed(0)
    h = 128
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=384, hidden_size=h, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=False))
    with torch.no_grad():
        emb = torch.randn(384, h)
        unit = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()  # what the final RMSNorm returns
        hf.model.embed_tokens.weight.copy_(emb)
        hf.lm_head.weight.zero_()
        for src, dst in chain.items():
            hf.lm_head.weight[ids[dst]] += unit[ids[src]] * scale / h
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    return ids
