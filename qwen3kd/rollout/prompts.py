"""Prompts for rollouts and data generation: JSONL → conversations → token ids in a given mode.

One line is one prompt: {"messages": [… ending with a user message]} or {"prompt": …, "system": …};
an optional "answer" is the reference answer (`qwen3kd eval` grades against it), an optional
"stratum" (a string) a subset `qwen3kd eval` also reports on its own (e.g. "hard"); an optional
"mode" ("think" | "no_think") fixes its mode, otherwise the mode is drawn per prompt
with probability `think_ratio` for think (seeded: the same prompt gets the same mode on every rank
and after a resume). Rendering uses the tokenizer's own chat template with `enable_thinking` from
the mode, so a no_think prompt ends with Qwen3's empty think block and the answer follows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3kd.config.schema import Mode
from qwen3kd.data.chat import ROLES
from qwen3kd.errors import DataError


@dataclass
class Prompt:
    messages: list[dict]
    mode: Mode | None  # fixed by the line; None: drawn by think_ratio
    line: int  # 1-based line in the file
    answer: str | None = None  # the reference answer, when the line has one
    stratum: str | None = None  # a subset eval reports on its own, when the line names one


def _parse(obj) -> tuple[list[dict], Mode | None, str | None, str | None]:
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    if "answer" in obj and not isinstance(obj["answer"], (str, int)):
        raise ValueError("'answer' must be a string or an integer")
    if "stratum" in obj and not isinstance(obj["stratum"], str):
        raise ValueError("'stratum' must be a string")
    mode = obj.get("mode")
    if mode is not None and mode not in (m.value for m in Mode):
        raise ValueError(f"mode must be 'think' or 'no_think', got {mode!r}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
    elif isinstance(obj.get("prompt"), str):
        msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        msgs.append({"role": "user", "content": obj["prompt"]})
    else:
        raise ValueError("expected 'messages' or a string 'prompt'")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: needs a 'role' ({', '.join(ROLES)}) and a string 'content'")
    if msgs[-1]["role"] != "user":
        raise ValueError("the last message must be the user's (the model answers it)")
    answer = obj.get("answer")
    return msgs, Mode(mode) if mode else None, None if answer is None else str(answer), obj.get("stratum")


def load_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a JSONL file; a malformed line is a DataError naming file and line."""
    path, prompts = Path(path), []
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                msgs, mode, answer, stratum = _parse(json.loads(text))
            except (json.JSONDecodeError, ValueError) as e:
                raise DataError(f"{path}:{n}: bad prompt: {e}") from None
            prompts.append(Prompt(msgs, mode, n, answer, stratum))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def prompt_mode(prompt: Prompt, index: int, think_ratio: float, seed: int) -> Mode:
    """The prompt's own mode, else a seeded draw (a function of seed and index only)."""
    if prompt.mode is not None:
        return prompt.mode
    u = np.random.default_rng([seed, index]).random()
    return Mode.think if u < think_ratio else Mode.no_think


def render_prompt(tokenizer, messages: list[dict], mode: Mode) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=mode is Mode.think)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
