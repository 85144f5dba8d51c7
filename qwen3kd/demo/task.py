"""The toy reasoning task of `make demo`: column arithmetic with carries.

A problem is `a + b` (both up to three digits) or `a * b` (a up to two digits, b one digit).
In think mode the answer carries its reasoning inside `<think>…</think>`: one line per column,
ones first, with the carry, then the digits read back; in no_think mode the result comes
directly. Both end with the same final line, `a + b = c`, whose last number `qwen3kd eval` grades:

    <think>
    ones: 7 + 5 = 12, carry 1
    tens: 4 + 8 + 1 = 13, carry 1
    hundreds: 3 + 2 + 1 = 6
    </think>

    347 + 285 = 632

The thinking is what makes the task tractable for a small model: each column's step is a
lookup, whereas the direct answer has to resolve the whole carry chain before writing the first
digit. So the think-mode accuracy of a small student shows what it learnt from the teacher's
reasoning, and the no_think accuracy shows what it can do without it (the mode switch).

Prompts and reference answers are JSONL lines `{"messages": [user], "mode"?, "answer": "632"}`
(the format `qwen3kd generate` and `qwen3kd eval` read); training conversations are chat JSONL
(`qwen3kd.data.chat`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3kd.files import write_text_atomic

COLUMNS = ("ones", "tens", "hundreds", "thousands")
OPS = ("+", "*")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+" or "*"
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b

    @property
    def answer(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}"

    @property
    def carries(self) -> int:
        """Columns whose sum (or product plus carry) reaches 10: the length of what a direct
        answer has to resolve before its first digit."""
        n, carry, width = 0, 0, len(str(self.a)) if self.op == "*" else len(str(max(self.a, self.b)))
        for col in range(width):
            x = self.a // 10**col % 10
            total = x + self.b // 10**col % 10 + carry if self.op == "+" else x * self.b + carry
            carry = total // 10
            n += carry > 0
        return n

    @property
    def reasoning(self) -> str:
        """Column by column, ones first, each with its carry."""
        lines, carry, width = [], 0, len(str(self.a)) if self.op == "*" else len(str(max(self.a, self.b)))
        for col in range(width):
            x = self.a // 10**col % 10
            if self.op == "+":
                y = self.b // 10**col % 10
                terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
                total = x + y + carry
                step = f"{terms} = {total}"
            else:
                # Two small steps rather than one: the product (a table fact), then the carry in.
                total = x * self.b + carry
                step = f"{x} * {self.b} = {x * self.b}" + (f", {x * self.b} + {carry} = {total}" if carry else "")
            carry = total // 10
            last = col == width - 1
            lines.append(f"{COLUMNS[col]}: {step}" + (f", carry {carry}" if carry and not last else ""))
        return "\n".join(lines)


def sample_problem(rng: np.random.Generator, ops: tuple[str, ...] = OPS) -> Problem:
    """Each operation equally often; operand lengths uniform in digits (not in value), so short
    and long carry chains are both common."""
    def number(max_digits: int) -> int:
        d = int(rng.integers(1, max_digits + 1))
        return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d))

    if ops[int(rng.integers(len(ops)))] == "+":
        return Problem(number(3), "+", number(3))
    return Problem(number(2), "*", int(rng.integers(2, 10)))


def split_problems(n_train: int, n_eval: int, seed: int,
                   ops: tuple[str, ...] = OPS) -> tuple[list[Problem], list[Problem]]:
    """Train / held-out problems from the same distribution: the held-out ones are distinct and
    never appear in training. Training problems may repeat (there are only ~800 products of a
    two-digit and a one-digit number, and half of the problems are products). The demo splits
    the held-out problems into its test set (the first) and its dev set (the rest)."""
    rng = np.random.default_rng(seed)
    held_out: dict[Problem, None] = {}
    while len(held_out) < n_eval:
        held_out[sample_problem(rng, ops)] = None
    train = []
    while len(train) < n_train:
        p = sample_problem(rng, ops)
        if p not in held_out:
            train.append(p)
    return train, list(held_out)


def conversation(p: Problem, mode: str) -> dict:
    msg = {"role": "assistant", "content": p.answer}
    if mode == "think":
        msg["reasoning_content"] = p.reasoning
    return {"messages": [{"role": "user", "content": p.question}, msg], "mode": mode}


HARD_CARRIES = 2  # the "hard" stratum of the evaluation: problems with at least two carries


def prompt_line(p: Problem, mode: str | None = None) -> dict:
    line = {"messages": [{"role": "user", "content": p.question}], "answer": str(p.result)}
    if p.carries >= HARD_CARRIES:
        line["stratum"] = "hard"
    if mode is not None:
        line["mode"] = mode
    return line


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    return write_text_atomic(Path(path), "".join(json.dumps(x) + "\n" for x in lines))


def corpus(problems: list[Problem]) -> list[str]:
    """Text for the tokenizer's merges: the task's own words and layout."""
    out = []
    for p in problems:
        out += [p.question, p.reasoning, p.answer]
    return out


def chat_corpus(problems: list[Problem]) -> list[str]:
    """The chat template's own words (roles, markers) as the template lays them out."""
    return [f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n" for p in problems]
