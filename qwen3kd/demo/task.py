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
import re
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
        return sum(total >= 10 for _, total in self.columns())

    @property
    def width(self) -> int:
        return len(str(self.a)) if self.op == "*" else len(str(max(self.a, self.b)))

    def columns(self) -> list[tuple[int, int]]:
        """Per column, ones first: (the carry into it, its total)."""
        out, carry = [], 0
        for col in range(self.width):
            x = self.a // 10**col % 10
            total = x + self.b // 10**col % 10 + carry if self.op == "+" else x * self.b + carry
            out.append((carry, total))
            carry = total // 10
        return out

    def line(self, col: int, total: int | None = None) -> str:
        """Column `col`'s reasoning line, with its true total, or with `total` written instead (a
        wrong line: its carry follows from the wrong total, as a slip's would)."""
        carry, true = self.columns()[col]
        total = true if total is None else total
        x = self.a // 10**col % 10
        if self.op == "+":
            y = self.b // 10**col % 10
            step = f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}"
        elif carry:
            # Two small steps rather than one: the product (a table fact), then the carry in.
            step = f"{x} * {self.b} = {x * self.b}, {x * self.b} + {carry} = {total}"
        else:
            step = f"{x} * {self.b} = {total}"
        last = col == self.width - 1
        return f"{COLUMNS[col]}: {step}" + (f", carry {total // 10}" if total // 10 and not last else "")

    @property
    def reasoning(self) -> str:
        """Column by column, ones first, each with its carry."""
        return "\n".join(self.line(col) for col in range(self.width))

    def wrong_total(self, col: int, rng: np.random.Generator) -> int:
        """A plausible slip in column `col`: its total off by 1 or 2 (never negative)."""
        true = self.columns()[col][1]
        options = [true + d for d in (-2, -1, 1, 2) if true + d >= 0]
        return int(options[int(rng.integers(len(options)))])

    def corrected_reasoning(self, col: int, wrong: int) -> tuple[str, str]:
        """The *recoverable* variant's trace: column `col` written with the wrong total, then its
        check line (CHECK + the right line), then the rest from the corrected value. Returns the
        trace and the wrong line (the span that carries no loss: the teacher learns to notice
        and repair a slip, not to make one)."""
        lines = [self.line(c) for c in range(self.width)]
        bad = self.line(col, wrong)
        return "\n".join([*lines[:col], bad, CHECK + lines[col], *lines[col + 1:]]), bad


# The check line's prefix: "check: tens: 4 + 8 + 1 = 13, carry 1" repairs the line above it.
CHECK = "check: "


def parse_question(question: str) -> Problem:
    """The problem of a prompt's question ("What is 347 + 285?")."""
    found = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", question.strip())
    if not found:
        raise ValueError(f"not a question of the task: {question!r}")
    return Problem(int(found[1]), found[2], int(found[3]))


def sample_problem(rng: np.random.Generator, ops: tuple[str, ...] = OPS) -> Problem:
    """Each operation equally often; operand lengths uniform in digits (not in value), so short
    and long carry chains are both common."""
    def number(max_digits: int) -> int:
        d = int(rng.integers(1, max_digits + 1))
        return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d))

    if ops[int(rng.integers(len(ops)))] == "+":
        return Problem(number(3), "+", number(3))
    return Problem(number(2), "*", int(rng.integers(2, 10)))


def split_problems(n_train: int, n_eval: int, seed: int, ops: tuple[str, ...] = OPS,
                   exclude: frozenset[Problem] = frozenset()) -> tuple[list[Problem], list[Problem]]:
    """Train / held-out problems from the same distribution: the held-out ones are distinct and
    never appear in training, and neither contains a problem of `exclude` (held-out sets drawn
    with seeds of their own). Training problems may repeat (there are only ~800 products of a
    two-digit and a one-digit number, and half of the problems are products). The demo splits
    the held-out problems into its test set (the first) and its dev set (the rest)."""
    rng = np.random.default_rng(seed)
    held_out: dict[Problem, None] = {}
    while len(held_out) < n_eval:
        p = sample_problem(rng, ops)
        if p not in exclude:
            held_out[p] = None
    train = []
    while len(train) < n_train:
        p = sample_problem(rng, ops)
        if p not in held_out and p not in exclude:
            train.append(p)
    return train, list(held_out)


def conversation(p: Problem, mode: str, slip: tuple[int, int] | None = None) -> dict:
    """A training conversation; `slip` = (column, wrong total): a think trace with that slip and
    its check line, the wrong line a `no_loss` span (read, not learned)."""
    msg = {"role": "assistant", "content": p.answer}
    if mode == "think":
        msg["reasoning_content"] = p.reasoning
        if slip is not None:
            msg["reasoning_content"], bad = p.corrected_reasoning(*slip)
            msg["no_loss"] = [bad]
    return {"messages": [{"role": "user", "content": p.question}, msg], "mode": mode}


def random_slip(p: Problem, rng: np.random.Generator) -> tuple[int, int]:
    col = int(rng.integers(p.width))
    return col, p.wrong_total(col, rng)


CHECK_COUNTS = ("errors", "checked", "corrected", "right", "false_alarms")  # read_checks' keys


def read_checks(p: Problem, thinking: str) -> dict[str, int]:
    """A think trace read against the problem: `errors` (column lines with a wrong total),
    `checked` (errors followed at once by a check line), `corrected` (checks with the right
    total), `right` (right column lines) and `false_alarms` (right lines followed by a check).
    A column is known by its name; a check line repairs the column line above it."""
    columns = {name: total for name, (_, total) in zip(COLUMNS, p.columns(), strict=False)}
    out = dict.fromkeys(CHECK_COUNTS, 0)
    lines = [x.strip() for x in thinking.strip().splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.startswith(CHECK):
            continue
        name, total = column_total(line)
        if name not in columns:
            continue
        after = lines[i + 1] if i + 1 < len(lines) else ""
        checks = after.startswith(CHECK)
        if total == columns[name]:
            out["right"] += 1
            out["false_alarms"] += checks
        else:
            out["errors"] += 1
            out["checked"] += checks
            out["corrected"] += checks and column_total(after[len(CHECK):]) == (name, columns[name])
    return out


def column_total(line: str) -> tuple[str, int | None]:
    """("tens", 13) of "tens: 4 + 8 + 1 = 13, carry 1"; the total is the line's last "= N"."""
    name, _, body = line.partition(": ")
    found = re.findall(r"= (\d+)", body)
    return name, int(found[-1]) if found else None


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
