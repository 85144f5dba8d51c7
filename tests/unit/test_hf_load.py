"""A Hugging Face Qwen3 checkpoint loaded into megatron gives transformers' logits (TP = 1 here;
other layouts in tests/distributed/test_hf_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_models import hf_logits, save_tiny_hf

from qwen3kd.checkpoint.hf import HFCheckpoint, load_hf_into
from qwen3kd.checkpoint.hf_mapping import Heads, merge, split
from qwen3kd.config.loader import load_config
from qwen3kd.config.validate import validate
from qwen3kd.errors import DataError

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
CASES = [("tiny-dense", []), ("tiny-dense", ["model.tie_word_embeddings=true"]), ("tiny-moe", [])]


def _megatron_logits(cfg, hf_dir, tokens):
    from qwen3kd.models.qwen3 import build_model

    (model,) = build_model(cfg, validate(cfg))
    load_hf_into([model], HFCheckpoint(hf_dir), cfg.model)
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


@pytest.mark.parametrize("preset,overrides", CASES)
def test_logits_match_transformers(megatron_world, tmp_path, preset, overrides):
    cfg = load_config(MODELS / f"{preset}.yaml", overrides)
    hf_dir = save_tiny_hf(cfg.model, tmp_path / "hf")
    assert len(list(hf_dir.glob("*.safetensors"))) > 1  # sharded, with an index
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, ref = _megatron_logits(cfg, hf_dir, tokens), hf_logits(hf_dir, tokens)
    assert ref.abs().max() > 0.1  # the models say something
    assert (ours - ref).abs().max().item() <= 1e-4


def test_qkv_and_gate_up_merges_invert():
    heads = Heads(heads=8, groups=2, dim=4)
    q, k, v = torch.randn(32, 16), torch.randn(8, 16), torch.randn(8, 16)
    qkv = merge("qkv", [q, k, v], heads)
    # Group 0 holds query heads 0..3, then k head 0, then v head 0.
    assert torch.equal(qkv[:16], q[:16]) and torch.equal(qkv[16:20], k[:4]) and torch.equal(qkv[20:24], v[:4])
    assert all(torch.equal(a, b) for a, b in zip(split("qkv", qkv, heads), [q, k, v], strict=True))
    g, u = torch.randn(6, 4), torch.randn(6, 4)
    assert all(torch.equal(a, b) for a, b in zip(split("gate_up", merge("gate_up", [g, u], heads), heads),
                                                 [g, u], strict=True))


def test_bad_checkpoints_name_the_problem(megatron_world, tmp_path):
    cfg = load_config(MODELS / "tiny-dense.yaml")
    hf_dir = save_tiny_hf(cfg.model, tmp_path / "hf")
    shard = sorted(hf_dir.glob("*.safetensors"))[1]
    shard.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=f"{shard}: shard file missing"):
        _megatron_logits(cfg, hf_dir, torch.zeros(1, 4, dtype=torch.long))
    other = load_config(MODELS / "tiny-dense.yaml", ["model.intermediate_size=256"])
    (tmp_path / "moved").rename(shard)
    with pytest.raises(DataError, match=r"model.intermediate_size: config 256, config.json 128"):
        _megatron_logits(other, hf_dir, torch.zeros(1, 4, dtype=torch.long))
    (hf_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(DataError, match="unsupported architecture 'LlamaForCausalLM'"):
        HFCheckpoint(hf_dir)


def test_training_starts_from_a_hugging_face_folder(tmp_path):
    """`checkpoint.load=<HF folder>`: the first loss is the transformers model's loss on step 1's batch."""
    from helpers import SMOKE, qwen3kd

    from qwen3kd.data.batches import micro_batches
    from qwen3kd.data.lm import SyntheticTokens
    from qwen3kd.tracking import read_metrics

    cfg = load_config(SMOKE / "lm-tiny-dense.yaml")
    hf_dir = save_tiny_hf(cfg.model, tmp_path / "hf")
    qwen3kd("train", str(SMOKE / "lm-tiny-dense.yaml"), f"checkpoint.load={hf_dir}",
            "train.steps=1", "optim.warmup_steps=0", f"run.dir={tmp_path / 'run'}")
    first = read_metrics(tmp_path / "run")[0]["train/loss"]
    t = cfg.train
    batches = micro_batches(SyntheticTokens(t.seed, cfg.model.vocab_size), 0,
                            t.global_batch_size, t.global_batch_size, 0, 1, t.seq_length)
    logits = hf_logits(hf_dir, batches[0].tokens)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batches[0].labels.flatten())
    assert first == pytest.approx(ref.item(), abs=1e-4)
