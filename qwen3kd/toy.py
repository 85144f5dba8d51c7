"""Toy distillation assets, built locally: a Qwen3-style tokenizer, a tiny teacher (Hugging Face
folder) and chat data in both modes. For the CPU smoke run and tests; real runs point the config
at real Qwen3 folders and data.

    python -m qwen3kd.toy OUT_DIR

writes OUT_DIR/{tokenizer/, teacher/, train.jsonl, eval.jsonl, prompts.jsonl}, which the
configs under configs/smoke/ read from runs/toy-assets/.

The conversations are arithmetic questions. In think mode the answer carries its reasoning
("3 + 4: add the ones …"); in no_think mode only the result. The teacher is random but sharp
(large output-layer weights), so its distribution is far from a fresh student's and the KL has
room to fall.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from qwen3kd.data.toy_tokenizer import build_toy_tokenizer
from qwen3kd.files import write_text_atomic

log = logging.getLogger(__name__)

TEACHER_PRESET = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-teacher.yaml"


def conversation(rng: np.random.Generator, mode: str) -> dict:
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    question = f"What is {a} + {b}?"
    answer = f"{a} + {b} = {a + b}."
    msg = {"role": "assistant", "content": answer}
    if mode == "think":
        msg["reasoning_content"] = (f"Add the ones: {a % 10} + {b % 10} = {a % 10 + b % 10}. "
                                    f"Add the tens: {a // 10 * 10} + {b // 10 * 10}. So {a + b}.")
    return {"messages": [{"role": "user", "content": question}, msg], "mode": mode}


def write_chat(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = [json.dumps(conversation(rng, "think" if i % 2 == 0 else "no_think")) for i in range(n)]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def write_prompts(path: Path, n: int, seed: int) -> Path:
    """Questions alone with their reference answers, for rollouts, data generation and rewards;
    every fourth line fixes its mode."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        user, reply = conversation(rng, "think")["messages"]
        line = {"messages": [user], "answer": reply["content"].split("= ")[1].rstrip(".")}
        if i % 4 == 3:
            line["mode"] = "no_think"
        lines.append(json.dumps(line))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def random_qwen3(m, seed: int):
    """A randomly initialised transformers Qwen3 of the preset `m` (a dense ModelConfig)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
        rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=m.tie_word_embeddings,
        initializer_range=m.init_std))


def save_hf(hf, out: Path, tokenizer_dir: Path) -> Path:
    """The model as a Hugging Face folder with the tokenizer's files next to the weights (where
    the trainer and vLLM look for them, as in a real checkpoint)."""
    from transformers import AutoTokenizer

    hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def save_teacher(out: Path, tokenizer_dir: Path, seed: int = 0, sharpness: float = 0.3) -> Path:
    """A random Qwen3 with the tiny-teacher architecture, its output layer scaled up (sharp)."""
    from qwen3kd.config.loader import load_config

    hf = random_qwen3(load_config(TEACHER_PRESET).model, seed)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0.0, sharpness)
    return save_hf(hf, out, tokenizer_dir)


def make_toy_assets(out: Path, seed: int = 0, train_lines: int = 256, eval_lines: int = 32,
                    prompt_lines: int = 64) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_toy_tokenizer(out / "tokenizer")
    save_teacher(out / "teacher", tok, seed)
    write_chat(out / "train.jsonl", train_lines, seed)
    write_chat(out / "eval.jsonl", eval_lines, seed + 1)
    write_prompts(out / "prompts.jsonl", prompt_lines, seed + 2)
    log.info("toy assets in %s", out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    make_toy_assets(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/toy-assets"))
