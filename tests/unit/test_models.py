"""Qwen3 presets: official sizes, and the analytic count equals megatron's real parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen3kd.config.loader import load_config
from qwen3kd.models.params import count_params, per_stage_params

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"

# Model-card figures (Hugging Face model cards of Qwen/Qwen3-*): total, non-embedding, activated,
# in billions, written to the precision the card gives.
CARDS = {
    "qwen3-0.6b": (0.6, 0.44, None),
    "qwen3-1.7b": (1.7, 1.4, None),
    "qwen3-4b": (4.0, 3.6, None),
    "qwen3-8b": (8.2, 6.95, None),
    "qwen3-14b": (14.8, 13.2, None),
    "qwen3-32b": (32.8, 31.2, None),
    "qwen3-30b-a3b": (30.5, 29.9, 3.3),
    "qwen3-235b-a22b": (235, 234, 22),
}


def _matches_card(count: int, card: float) -> bool:
    """The card prints `card` billions to some digits, rounded or truncated (Qwen3-30B-A3B's
    3.353 B activated is printed 3.3 B): accept [card − ½ unit, card + 1 unit)."""
    s = repr(card)
    unit = 10 ** -(len(s.split(".")[1]) if "." in s else 0)
    return card - unit / 2 <= count / 1e9 < card + unit


@pytest.mark.parametrize("name", sorted(CARDS))
def test_preset_parameter_count_matches_model_card(name):
    cfg = load_config(MODELS / f"{name}.yaml")
    c = count_params(cfg.model)
    total, non_emb, active = CARDS[name]
    assert _matches_card(c.total, total), c
    assert _matches_card(c.non_embedding, non_emb), c
    if active is not None:
        assert _matches_card(c.active, active), c
    assert cfg.model.vocab_size == 151936


def test_qwen3_0_6b_exact_count():
    c = count_params(load_config(MODELS / "qwen3-0.6b.yaml").model)
    # 28 layers × 15,730,944 + final norm 1,024 + tied embedding 151,936 × 1,024.
    assert c.total == 596_049_920
    assert c.embedding == 155_582_464


def test_pipeline_stages_add_up():
    m = load_config(MODELS / "qwen3-235b-a22b.yaml").model
    stages = per_stage_params(m, 8, 11, 11)
    c = count_params(m)
    # The last stage holds the (untied) lm_head; together the stages hold every parameter once.
    assert sum(stages) == c.total
    assert len(stages) == 8


@pytest.mark.parametrize(
    "preset,overrides",
    [("tiny-dense", []), ("tiny-dense", ["model.tie_word_embeddings=true"]), ("tiny-moe", [])],
)
def test_built_megatron_model_has_the_counted_parameters(megatron_world, preset, overrides):
    from megatron.core.models.gpt import GPTModel

    from qwen3kd.models.qwen3 import build_model

    cfg = load_config(MODELS / f"{preset}.yaml", overrides)
    (model,) = build_model(cfg, megatron_world)
    assert isinstance(model, GPTModel)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(cfg.model).total
    # Qwen3 structure: QK-norm present, no biases, RMSNorm everywhere.
    names = dict(model.named_parameters())
    assert any("q_layernorm" in k for k in names) and any("k_layernorm" in k for k in names)
    assert not any(k.endswith(".bias") for k in names)
    norms = [m for k, m in model.named_modules()
             if k.endswith("layernorm") and "cross_attn" not in k]  # decoder-only: no cross-attn
    assert norms and all(isinstance(m, torch.nn.RMSNorm) for m in norms)
    assert all(m.eps == cfg.model.rms_norm_eps for m in norms)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    logits = model(tokens, torch.arange(16).expand(2, 16), None)
    assert logits.shape == (2, 16, cfg.model.vocab_size)
