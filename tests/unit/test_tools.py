import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The published config.json of Qwen/Qwen3-0.6B (the fields that matter; values as on the Hub).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": True, "vocab_size": 151936, "torch_dtype": "bfloat16",
}


def _check(preset: str, cfg: dict, tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return subprocess.run([sys.executable, str(ROOT / "tools/check_preset.py"),
                           str(ROOT / "configs/models" / preset), str(path)],
                          capture_output=True, text=True, cwd=ROOT)


def test_check_preset_accepts_the_official_config(tmp_path):
    p = _check("qwen3-0.6b.yaml", QWEN3_06B, tmp_path)
    assert p.returncode == 0, p.stderr


def test_check_preset_names_each_difference(tmp_path):
    p = _check("qwen3-1.7b.yaml", QWEN3_06B, tmp_path)
    assert p.returncode == 1
    assert "model.hidden_size: preset 2048, config.json 1024" in p.stderr
    assert "model.intermediate_size: preset 6144, config.json 3072" in p.stderr
