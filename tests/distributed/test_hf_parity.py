"""A Hugging Face checkpoint gives transformers' logits (max |Δ| ≤ 1e-4, fp32) at TP=1, TP=2,
PP=2 and EP=2, both loaded directly and after `qwen3kd convert --to megatron` (the converted
checkpoint is written at TP=PP=EP=1 and resharded on load); and the rollout weight sync gathers
exactly the folder's tensors back from each of those layouts."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, qwen3kd, torchrun
from hf_models import hf_logits, save_tiny_hf

from qwen3kd.config.loader import load_config

pytestmark = pytest.mark.distributed

MODELS = ROOT / "configs" / "models"
TIED = ["model.tie_word_embeddings=true"]
CASES = {
    "dense-tp1": ("tiny-dense", [], []),
    "tied-tp1": ("tiny-dense", TIED, []),
    "moe-tp1": ("tiny-moe", [], []),
    "dense-tp2": ("tiny-dense", [], ["parallel.tensor=2"]),
    "dense-pp2": ("tiny-dense", [], ["parallel.pipeline=2"]),
    "tied-tp2": ("tiny-dense", TIED, ["parallel.tensor=2"]),
    "tied-pp2": ("tiny-dense", TIED, ["parallel.pipeline=2"]),
    "moe-ep2": ("tiny-moe", [], ["parallel.expert=2"]),
    "moe-tp2": ("tiny-moe", [], ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "moe-pp2": ("tiny-moe", [], ["parallel.pipeline=2"]),
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """One saved transformers model (and its reference logits) per model variant."""
    out = {}
    for preset, model_overrides, _ in CASES.values():
        key = (preset, tuple(model_overrides))
        if key in out:
            continue
        cfg = load_config(MODELS / f"{preset}.yaml", model_overrides)
        root = tmp_path_factory.mktemp(preset)
        path = save_tiny_hf(cfg.model, root / "hf")
        qwen3kd("convert", str(path), str(root / "megatron"), "--to", "megatron")
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        out[key] = (path, root / "megatron", hf_logits(path, tokens))
    return out


@pytest.mark.parametrize("case", CASES)
def test_layout_logits_match_transformers(hf_folders, case, tmp_path):
    preset, model_overrides, layout = CASES[case]
    hf_dir, megatron_dir, ref = hf_folders[(preset, tuple(model_overrides))]
    out = tmp_path / "logits"
    torchrun(ROOT / "tests/distributed/hf_logits_worker.py", f"{hf_dir},{megatron_dir}", str(out),
             str(MODELS / f"{preset}.yaml"), *model_overrides, *layout)
    assert ref.abs().max() > 0.1  # the model says something
    for source in (0, 1):  # loaded directly, then converted
        ours = torch.load(f"{out}.{source}.pt")
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4, ("direct", "converted")[source]
    # The weight sync's gather (every data-parallel replica's first rank): the same names and
    # bitwise the same tensors as the Hugging Face folder.
    import json

    replicas = json.loads((tmp_path / "logits.sync.json").read_text())
    assert len(replicas) == (2 if case in ("dense-tp1", "tied-tp1", "moe-tp1", "moe-ep2") else 1)
    for r in replicas:
        assert r["tensors"] > 0 and not (r["missing"] or r["extra"] or r["different"]), r
