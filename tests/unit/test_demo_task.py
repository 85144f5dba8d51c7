"""The demo's toy task (qwen3kd/demo/task.py) and the grading of `qwen3kd eval`
(qwen3kd/rollout/accuracy.py): the reasoning is correct arithmetic, the splits are disjoint, the
grader reads the final number of the answer and nothing of the thinking."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qwen3kd.config.schema import Mode
from qwen3kd.demo import task
from qwen3kd.rollout.accuracy import final_answer, grade, think_tokens
from qwen3kd.rollout.engine import Rollout
from qwen3kd.rollout.prompts import Prompt


def test_worked_examples():
    p = task.Problem(347, "+", 285)
    assert p.reasoning == ("ones: 7 + 5 = 12, carry 1\ntens: 4 + 8 + 1 = 13, carry 1\n"
                           "hundreds: 3 + 2 + 1 = 6")
    assert p.answer == "347 + 285 = 632" and p.question == "What is 347 + 285?"
    m = task.Problem(94, "*", 4)
    assert m.reasoning == "ones: 4 * 4 = 16, carry 1\ntens: 9 * 4 = 36, 36 + 1 = 37"
    assert m.answer == "94 * 4 = 376"
    assert task.Problem(999, "+", 1).reasoning.splitlines()[-1] == "hundreds: 9 + 0 + 1 = 10"


def test_every_step_of_the_reasoning_is_true_and_gives_the_result():
    """Replay the reasoning: each `x op y (+ c) = t` holds, the carries follow, and the digits
    written (each column's last digit, the last column whole) spell the result."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        p = task.sample_problem(rng)
        digits, carry = [], 0
        lines = p.reasoning.splitlines()
        for col, line in enumerate(lines):
            name, _, body = line.partition(": ")
            assert name == task.COLUMNS[col]
            for expr, value in re.findall(r"([\d +*]+?) = (\d+)", body):
                assert eval(expr) == int(value), line  # noqa: S307 (digits and + * only)
            total = int(re.findall(r"= (\d+)", body)[-1])
            shown = re.search(r"carry (\d+)$", body)
            assert (int(shown.group(1)) if shown else 0) == (total // 10 if col < len(lines) - 1 else 0)
            digits.append(str(total) if col == len(lines) - 1 else str(total % 10))
            carry = total // 10
        assert int("".join(reversed(digits))) == p.result, (p, p.reasoning)
        assert carry == p.result // 10 ** len(lines)
        assert p.op in "+*" and (p.b < 10 if p.op == "*" else True)


def test_splits_are_disjoint_and_seeded():
    train, held_out = task.split_problems(3000, 200, seed=5)
    assert len(train) == 3000 and len(held_out) == 200
    assert not set(train) & set(held_out) and len(set(held_out)) == 200
    assert task.split_problems(3000, 200, seed=5) == (train, held_out)
    ops = [p.op for p in train]
    assert 0.4 < ops.count("+") / len(ops) < 0.6


def test_conversation_and_prompt_lines():
    p = task.Problem(12, "*", 3)
    think = task.conversation(p, "think")
    assert think["mode"] == "think" and think["messages"][1]["reasoning_content"] == p.reasoning
    assert "reasoning_content" not in task.conversation(p, "no_think")["messages"][1]
    assert task.prompt_line(p) == {"messages": [{"role": "user", "content": "What is 12 * 3?"}],
                                   "answer": "36"}
    # Two carries or more: the evaluation's "hard" stratum.
    assert task.prompt_line(task.Problem(347, "+", 285))["stratum"] == "hard"


def test_carries_are_the_columns_of_the_reasoning_that_reach_ten():
    rng = np.random.default_rng(3)
    for _ in range(300):
        p = task.sample_problem(rng)
        totals = [int(re.findall(r"= (\d+)", line)[-1]) for line in p.reasoning.splitlines()]
        assert p.carries == sum(t >= 10 for t in totals), (p, p.reasoning)
    assert [task.Problem(*x).carries for x in [(347, "+", 285), (999, "+", 1), (12, "+", 3), (15, "*", 7)]] \
        == [2, 3, 0, 2]


def _rollout(tok, text: str, mode: Mode) -> Rollout:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return Rollout(prompt_ids=[], response_ids=ids, logprobs=[0.0] * len(ids), sampled=[True] * len(ids),
                   finish_reason="stop", mode=mode)


@pytest.mark.parametrize("text, expected", [
    ("12 * 3 = 36", "36"), ("the answer is -4.", "-4"), ("no number", None), ("1 + 2 = 3\n", "3")])
def test_final_answer_is_the_last_integer(text, expected):
    assert final_answer(text) == expected


def test_grade_reads_the_answer_not_the_thinking(toy_assets):
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.prompts import render_prompt

    tok = load_tokenizer(toy_assets / "tokenizer")
    msgs = [{"role": "user", "content": "What is 12 * 3?"}]
    prompt = Prompt(msgs, None, 1, "36")
    cases = [  # (mode, response, correct, compliant)
        (Mode.think, "<think>\nones: 2 * 3 = 6\ntens: 1 * 3 = 3\n</think>\n\n12 * 3 = 36<|im_end|>", True, True),
        (Mode.think, "<think>\n12 * 3 = 36\n</think>\n\n12 * 3 = 35<|im_end|>", False, True),  # thinking ignored
        (Mode.think, "12 * 3 = 36<|im_end|>", True, False),  # right, but it did not think
        (Mode.no_think, "12 * 3 = 36<|im_end|>", True, True),
        (Mode.no_think, "<think>\nhm\n</think>\n\n12 * 3 = 36<|im_end|>", True, False),
    ]
    rollouts = []
    for mode, text, _, _ in cases:
        r = _rollout(tok, text, mode)
        r.prompt_ids = render_prompt(tok, msgs, mode)
        rollouts.append(r)
    metrics, records = grade(tok, [(prompt, m) for m, *_ in cases], rollouts)
    assert [r["correct"] for r in records] == [c[2] for c in cases]
    assert [r["compliant"] for r in records] == [c[3] for c in cases]
    assert metrics["think"]["accuracy"] == pytest.approx(2 / 3)
    assert metrics["no_think"]["compliance"] == 0.5 and metrics["all"]["n"] == 5
    think = (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"))
    inner = tok("\nones: 2 * 3 = 6\ntens: 1 * 3 = 3\n", add_special_tokens=False)["input_ids"]
    assert think_tokens(rollouts[0], think) == len(inner) and think_tokens(rollouts[3], think) == 0
