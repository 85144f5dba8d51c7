"""pass@k: the unbiased estimator equals brute-force enumeration over every k-subset of n answers,
and `grade` averages it per mode and stratum from the sampled answers' correctness."""

from __future__ import annotations

from itertools import combinations

import pytest

from qwen3kd.config.schema import Mode
from qwen3kd.rollout.accuracy import pass_at_k


@pytest.mark.parametrize("n", range(1, 9))
def test_estimator_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        answers = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(answers, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_estimator_at_scale_and_bad_arguments():
    # n = 200, c = 3, k = 64 (the report's pass@64): 1 − C(197, 64)/C(200, 64), by exact integers.
    from math import comb

    assert pass_at_k(200, 3, 64) == pytest.approx(1 - comb(197, 64) / comb(200, 64), rel=1e-12)
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_grade_averages_pass_at_k_per_mode_and_stratum(toy_assets):
    from test_demo_task import _rollout

    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.accuracy import grade
    from qwen3kd.rollout.prompts import Prompt, render_prompt

    tok = load_tokenizer(toy_assets / "tokenizer")
    msgs = [{"role": "user", "content": "What is 12 * 3?"}]
    easy, hard = Prompt(msgs, None, 1, "36"), Prompt(msgs, None, 2, "36", stratum="hard")

    def answer(text: str, mode: Mode):
        r = _rollout(tok, text, mode)
        r.prompt_ids = render_prompt(tok, msgs, mode)
        return r

    right, wrong = "12 * 3 = 36<|im_end|>", "12 * 3 = 35<|im_end|>"
    asked = [(easy, Mode.no_think), (hard, Mode.no_think)]
    greedy = [answer(wrong, Mode.no_think), answer(right, Mode.no_think)]
    # 4 samples each: the easy problem 1 right, the hard one 0 right.
    sampled = [[answer(t, Mode.no_think) for t in (right, wrong, wrong, wrong)],
               [answer(wrong, Mode.no_think)] * 4]
    metrics, records = grade(tok, asked, greedy, sampled, [1, 2, 4])
    assert [r["sampled_correct"] for r in records] == [1, 0]
    assert metrics["no_think"]["pass_at_k"] == pytest.approx({"1": 1 / 8, "2": 1 / 4, "4": 1 / 2})
    assert metrics["no_think/hard"]["n"] == 1 and metrics["no_think/hard"]["accuracy"] == 1.0
    assert metrics["no_think/hard"]["pass_at_k"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    assert "pass_at_k" not in grade(tok, asked, greedy)[0]["no_think"]
