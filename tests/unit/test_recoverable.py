"""The study's *recoverable* variant (issue 18): a think trace with one slip and its check line,
the slip a span that carries no loss, the reading of a trace's checks, and the teacher gate
(qwen3kd/study/gate.py) against scripted teachers whose rates are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3kd.demo import task
from qwen3kd.study.gate import GateResult, prefixes, run_gate


def test_hand_written_slip_and_its_check():
    p = task.Problem(347, "+", 285)
    trace, bad = p.corrected_reasoning(1, 14)
    assert bad == "tens: 4 + 8 + 1 = 14, carry 1"
    assert trace == ("ones: 7 + 5 = 12, carry 1\n"
                     "tens: 4 + 8 + 1 = 14, carry 1\n"
                     "check: tens: 4 + 8 + 1 = 13, carry 1\n"
                     "hundreds: 3 + 2 + 1 = 6")
    # A slip's carry follows from its wrong total; a product line keeps its table fact.
    assert p.line(0, 9) == "ones: 7 + 5 = 9"
    assert task.Problem(94, "*", 4).line(1, 38) == "tens: 9 * 4 = 36, 36 + 1 = 38"
    conv = task.conversation(p, "think", (1, 14))
    msg = conv["messages"][1]
    assert msg["no_loss"] == [bad] and msg["reasoning_content"] == trace
    assert "no_loss" not in task.conversation(p, "no_think", (1, 14))["messages"][1]


def test_slips_are_wrong_and_near():
    rng = np.random.default_rng(0)
    for _ in range(500):
        p = task.sample_problem(rng)
        col, wrong = task.random_slip(p, rng)
        true = p.columns()[col][1]
        assert wrong != true and abs(wrong - true) <= 2 and wrong >= 0 and 0 <= col < p.width


def test_read_checks_of_hand_written_traces():
    p = task.Problem(347, "+", 285)
    trace, _ = p.corrected_reasoning(1, 14)
    assert task.read_checks(p, trace) == {"errors": 1, "checked": 1, "corrected": 1, "right": 2,
                                          "false_alarms": 0}
    # A slip left alone; a check after a right line; a check that repairs to a wrong value.
    assert task.read_checks(p, "ones: 7 + 5 = 12, carry 1\ntens: 4 + 8 + 1 = 14, carry 1\n"
                               "hundreds: 3 + 2 + 1 = 7") == {
        "errors": 2, "checked": 0, "corrected": 0, "right": 1, "false_alarms": 0}
    assert task.read_checks(p, "ones: 7 + 5 = 12, carry 1\ncheck: ones: 7 + 5 = 12, carry 1") == {
        "errors": 0, "checked": 0, "corrected": 0, "right": 1, "false_alarms": 1}
    assert task.read_checks(p, "ones: 7 + 5 = 11, carry 1\ncheck: ones: 7 + 5 = 13, carry 1") == {
        "errors": 1, "checked": 1, "corrected": 0, "right": 0, "false_alarms": 0}
    assert task.read_checks(p, p.reasoning)["right"] == 3


def _problems(n: int) -> list[task.Problem]:
    return task.split_problems(0, n, seed=3)[1]


def _teacher(miss_every: int = 0, wrong_every: int = 0, alarm_every: int = 0):
    """A scripted teacher: the right next line, except that every miss_every-th slip goes
    unchecked, every wrong_every-th check has a wrong total and every alarm_every-th right line
    is followed by a check."""
    def complete(cases):
        out, slips, rights = [], 0, 0
        for p, prefix in cases:
            name, total = task.column_total(prefix.splitlines()[-1])
            col = task.COLUMNS.index(name)
            true = p.columns()[col][1]
            nxt = p.line(col + 1) if col + 1 < p.width else "</think>"
            if total != true:
                slips += 1
                if miss_every and slips % miss_every == 0:
                    out.append(nxt + "\n")
                    continue
                fix = true + 1 if wrong_every and slips % wrong_every == 0 else true
                out.append(task.CHECK + p.line(col, fix) + "\n" + nxt)
            else:
                rights += 1
                alarm = alarm_every and rights % alarm_every == 0
                out.append((task.CHECK + p.line(col) + "\n" if alarm else "") + nxt)
        return out
    return complete


def test_prefixes_half_wrong_half_right():
    cases = prefixes(_problems(200), seed=0)
    wrong = [c for c in cases if c[2] is not None]
    assert len(wrong) == 100
    for p, prefix, truth in cases:
        name, total = task.column_total(prefix.splitlines()[-1])
        assert (total != p.columns()[task.COLUMNS.index(name)][1]) == (truth is not None)
        # Every line before the last is right: the trace is the teacher's own up to the cut.
        assert task.read_checks(p, "\n".join(prefix.splitlines()[:-1]))["errors"] == 0


@pytest.mark.parametrize("teacher, check, value, alarm, passed", [
    (_teacher(), 1.0, 1.0, 0.0, True),
    (_teacher(miss_every=10), 0.9, 1.0, 0.0, False),      # misses 10 % of the slips
    (_teacher(miss_every=50), 0.98, 1.0, 0.0, True),
    (_teacher(wrong_every=10), 1.0, 0.9, 0.0, False),     # repairs to a wrong value
    (_teacher(alarm_every=50), 1.0, 1.0, 0.02, False),    # 2 % false alarms
    (_teacher(alarm_every=100), 1.0, 1.0, 0.01, True),    # exactly at the 1 % bound
])
def test_gate_against_scripted_teachers(teacher, check, value, alarm, passed):
    result = run_gate(_problems(400), teacher, seed=1)
    assert (result.corrupted, result.clean) == (200, 200)
    assert result.check_rate == pytest.approx(check)
    assert result.right_value_rate == pytest.approx(value)
    assert result.false_alarm_rate == pytest.approx(alarm)
    assert result.passed is passed and result.as_dict()["passed"] is passed


def test_gate_bounds():
    assert GateResult(10, 10, 0.95, 0.95, 0.01).passed
    assert not GateResult(10, 10, 0.949, 0.95, 0.01).passed
    assert not GateResult(10, 10, 0.95, 0.949, 0.01).passed
    assert not GateResult(10, 10, 0.95, 0.95, 0.011).passed
