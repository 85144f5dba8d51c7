"""`qwen3kd convert`: Hugging Face → Megatron → Hugging Face is bitwise, the result loads in
transformers, a training checkpoint exports, and bad input fails cleanly with nothing left behind.
(Logits of converted checkpoints at TP / PP / EP: tests/distributed/test_hf_parity.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SMOKE, last_checkpoint, qwen3kd
from hf_models import hf_logits, save_tiny_hf
from safetensors import safe_open
from safetensors.torch import save_file

from qwen3kd.checkpoint.convert import hf_to_megatron, megatron_to_hf
from qwen3kd.config.loader import load_config
from qwen3kd.errors import DataError, UserError

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def _model(preset: str, *overrides: str):
    return load_config(MODELS / f"{preset}.yaml", list(overrides)).model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _other_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()
            if f.is_file() and not f.name.startswith("model")}


@pytest.mark.parametrize("preset,overrides,dtype", [
    ("tiny-dense", [], torch.bfloat16),
    ("tiny-dense", ["model.tie_word_embeddings=true"], torch.float32),
    ("tiny-moe", [], torch.bfloat16),
])
def test_round_trip_is_bitwise_and_loads_in_transformers(megatron_world, tmp_path, preset, overrides, dtype):
    src = save_tiny_hf(_model(preset, *overrides), tmp_path / "hf", dtype=dtype)
    # Small files on both sides, so the streaming writers split their output.
    hf_to_megatron(src, tmp_path / "megatron", file_bytes=64 << 10)
    assert len(list((tmp_path / "megatron").glob("*.distcp"))) > 1
    megatron_to_hf(tmp_path / "megatron", tmp_path / "back", shard_bytes=100_000)
    back = tmp_path / "back"
    a, b = _tensors(src), _tensors(back)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
    assert ("lm_head.weight" in b) == ("model.tie_word_embeddings=true" not in overrides)
    assert _other_files(src) == _other_files(back)  # config, generation config, tokenizer: unchanged
    assert len(json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]) == len(a)
    assert torch.equal(hf_logits(back, TOKENS), hf_logits(src, TOKENS))
    assert not list(tmp_path.glob("*.tmp"))


def test_training_checkpoint_exports_its_student(tmp_path):
    """A run started from a Hugging Face folder: its checkpoint exports to a folder transformers
    loads, holding the trained weights and the original's config and tokenizer files."""
    src = save_tiny_hf(_model("tiny-dense"), tmp_path / "hf")
    run = tmp_path / "run"
    qwen3kd("train", str(SMOKE / "lm-tiny-dense.yaml"), f"checkpoint.load={src}", "train.steps=2",
            "optim.warmup_steps=0", f"run.dir={run}")
    ckpt = last_checkpoint(run)
    # Several pairs in one process (as `qwen3kd eval` exports checkpoints): each is whole.
    qwen3kd("convert", str(ckpt), str(tmp_path / "out"), str(ckpt), str(tmp_path / "again"), "--to", "hf")
    out = tmp_path / "out"
    assert _tensors(tmp_path / "again").keys() == _tensors(out).keys()
    assert all(torch.equal(t, _tensors(out)[k]) for k, t in _tensors(tmp_path / "again").items())
    assert _other_files(out) == _other_files(src)
    before, after = _tensors(src), _tensors(out)
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])  # it trained
    from helpers import global_weights

    trained = global_weights(ckpt)
    assert torch.equal(after["model.embed_tokens.weight"], trained["embedding.word_embeddings.weight"])
    assert torch.isfinite(hf_logits(out, TOKENS)).all()


def test_missing_shard_fails_cleanly_from_the_command_line(tmp_path):
    src = save_tiny_hf(_model("tiny-dense"), tmp_path / "hf")
    shard = sorted(src.glob("model-*.safetensors"))[2]
    shard.unlink()
    p = qwen3kd("convert", str(src), str(tmp_path / "dst"), "--to", "megatron", check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == f"qwen3kd: error: {shard}: shard file missing (listed in " \
                               f"{src / 'model.safetensors.index.json'})"
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.tmp").exists()
    odd = qwen3kd("convert", str(src), str(tmp_path / "dst"), str(src), "--to", "megatron", check=False)
    assert odd.returncode == 2 and "SRC DST pairs expected, got 3 paths" in odd.stderr


def test_bad_input_names_the_problem_and_leaves_nothing(megatron_world, tmp_path):
    src = save_tiny_hf(_model("tiny-dense"), tmp_path / "hf")
    dst = tmp_path / "dst"

    def fails(exc, match, fn, *args, **kw):
        with pytest.raises(exc, match=match):
            fn(*args, **kw)
        assert not dst.exists() and not (tmp_path / "dst.tmp").exists()

    # A model preset other than the checkpoint's.
    fails(DataError, r"does not match the preset: model.num_hidden_layers: preset 2, config.json 4", hf_to_megatron, src, dst,
          _model("tiny-moe"))
    # A tensor of the wrong shape: the whole shard rewritten with one tensor transposed.
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    shard = src / index[name]
    with safe_open(shard, "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    good = tensors[name].clone()
    tensors[name] = good.t().contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    fails(DataError, rf"tensor '{name}' \(in {index[name]}\) has shape \(128, 64\), the model "
          r"from config.json needs \(64, 128\)", hf_to_megatron, src, dst)
    tensors[name] = good
    save_file(tensors, str(shard), metadata={"format": "pt"})
    # An architecture that is not Qwen3.
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    fails(DataError, r"unsupported architecture 'LlamaForCausalLM'", hf_to_megatron, src, dst)
    (src / "config.json").write_text(json.dumps(config))
    # Export with the wrong preset; and an existing destination is never overwritten.
    hf_to_megatron(src, tmp_path / "megatron")
    fails(DataError, r"checkpoint is for another model", megatron_to_hf, tmp_path / "megatron", dst,
          _model("tiny-moe"))
    dst.mkdir()
    with pytest.raises(UserError, match="already exists"):
        hf_to_megatron(src, dst)


def test_training_refuses_a_checkpoint_of_another_model(megatron_world, tmp_path):
    hf_to_megatron(save_tiny_hf(_model("tiny-dense"), tmp_path / "hf"), tmp_path / "megatron")
    p = qwen3kd("train", str(SMOKE / "lm-tiny-moe.yaml"), f"checkpoint.load={tmp_path / 'megatron'}",
                f"run.dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2
    assert "checkpoint is for another model than the config's 'tiny-moe'" in p.stderr
    assert "model.num_experts: config 4, checkpoint (hf) 0" in p.stderr
