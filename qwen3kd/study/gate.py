"""The *recoverable* variant's teacher gate (study/protocol.md, section 4), checked before any arm
of that variant runs: does the teacher notice a slip and repair it, and leave right lines alone?

Held-out problems, each cut into a think-trace prefix that ends with one column line: a wrong
line (its total off by 1 or 2, as the variant's training data slips) or a right one. The teacher
continues each prefix greedily; its next line is read. It passes when, after a wrong line, it
writes the check line (`task.CHECK` + the column's line) ≥ 95 % of the time, with the right total
in ≥ 95 % of those checks, and after a right line writes a check ≤ 1 % of the time. A failed gate
voids the variant: its arms would test a teacher that cannot score recoveries.

`complete` is the teacher: prefix texts in, the text it writes next out (the study runs it in
vLLM, `vllm_completer`; the tests give it scripted teachers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qwen3kd.demo import task

log = logging.getLogger(__name__)

CHECK_RATE, RIGHT_VALUE_RATE, FALSE_ALARM_RATE = 0.95, 0.95, 0.01

# (problem, the trace so far, ending with the column line under test) -> the teacher's next text
Completer = Callable[[list[tuple[task.Problem, str]]], list[str]]


@dataclass(frozen=True)
class GateResult:
    corrupted: int  # prefixes ending with a wrong line
    clean: int  # prefixes ending with a right line
    check_rate: float  # checks after a wrong line
    right_value_rate: float  # of those checks, the ones with the column's right total
    false_alarm_rate: float  # checks after a right line

    @property
    def passed(self) -> bool:
        return (self.check_rate >= CHECK_RATE and self.right_value_rate >= RIGHT_VALUE_RATE
                and self.false_alarm_rate <= FALSE_ALARM_RATE)

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def prefixes(problems: list[task.Problem], seed: int) -> list[tuple[task.Problem, str, int | None]]:
    """Per problem one prefix: the trace up to a random column, whose line is wrong for the
    first half of the problems and right for the second. Returns (problem, prefix, the column's
    right total if its line is wrong else None)."""
    rng = np.random.default_rng(seed)
    out, half = [], len(problems) // 2
    for i, p in enumerate(problems):
        col = int(rng.integers(p.width))
        lines = [p.line(c) for c in range(col)]
        if i < half:
            lines.append(p.line(col, p.wrong_total(col, rng)))
            out.append((p, "\n".join(lines), p.columns()[col][1]))
        else:
            lines.append(p.line(col))
            out.append((p, "\n".join(lines), None))
    return out


def run_gate(problems: list[task.Problem], complete: Completer, seed: int = 0) -> GateResult:
    cases = prefixes(problems, seed)
    written = complete([(p, prefix) for p, prefix, _ in cases])
    corrupted = checked = right_value = clean = alarms = 0
    for (_, prefix, truth), text in zip(cases, written, strict=True):
        nxt = next((x.strip() for x in text.splitlines() if x.strip()), "")
        checks = nxt.startswith(task.CHECK)
        if truth is None:
            clean += 1
            alarms += checks
            continue
        corrupted += 1
        if checks:
            checked += 1
            name = prefix.splitlines()[-1].partition(": ")[0]
            right_value += task.column_total(nxt[len(task.CHECK):]) == (name, truth)
    result = GateResult(corrupted, clean, checked / max(corrupted, 1), right_value / max(checked, 1),
                        alarms / max(clean, 1))
    log.info("teacher gate: %s", result.as_dict())
    return result


def teacher_gate(cfg, teacher: Path, gate_prompts: Path) -> GateResult:
    """The gate of the teacher's Hugging Face folder on the problems of `gate_prompts` (prompt
    lines), greedy in an in-process vLLM engine (cfg: the demo's experiment config)."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.prompts import load_prompts
    from qwen3kd.rollout.vllm_engine import VllmEngine

    problems = [task.parse_question(p.messages[-1]["content"]) for p in load_prompts(gate_prompts)]
    tok = load_tokenizer(teacher)
    rcfg = replace(OmegaConf.to_object(cfg.rollout), temperature=0.0, top_p=1.0, top_k=0,
                   thinking_budget=None, max_new_tokens=32)
    engine = VllmEngine(teacher, tok, rcfg, cfg.train.seq_length + 1, cfg.data.end_of_turn, in_process=True)
    try:
        return run_gate(problems, vllm_completer(engine, tok), seed=cfg.demo.seed)
    finally:
        engine.close()


def recovery(samples: Path, prompts: Path, models) -> dict:
    """Per model, how its greedy think traces (`qwen3kd eval`'s samples/NAME.jsonl, answering the
    prompt lines of `prompts`) handle their own slips (task.read_checks): the self-check rate
    after a wrong column line, the share of checks that repair it, false alarms after right lines."""
    import json

    from qwen3kd.rollout.prompts import load_prompts

    problems = {p.line: task.parse_question(p.messages[-1]["content"]) for p in load_prompts(prompts)}
    out = {}
    for m in models:
        sums = dict.fromkeys(task.CHECK_COUNTS, 0)
        for line in (samples / f"{m}.jsonl").read_text().splitlines():
            r = json.loads(line)
            thinking = r["response"].partition("<think>")[2].partition("</think>")[0]
            if r["mode"] == "think" and thinking:
                for k, v in task.read_checks(problems[r["prompt_line"]], thinking).items():
                    sums[k] += v
        out[m] = {**sums, "self_check_rate": sums["checked"] / max(sums["errors"], 1),
                  "correction_success": sums["corrected"] / max(sums["checked"], 1),
                  "false_alarm_rate": sums["false_alarms"] / max(sums["right"], 1)}
    return out


def vllm_completer(engine, tokenizer) -> Completer:
    """The teacher in a rollout engine (qwen3kd/rollout/vllm_engine.py), think mode, greedy: the
    prompt as the chat template renders it, then the answer's opening `<think>` and the prefix;
    the engine's rollout.max_new_tokens bounds what it writes (only its first line is read)."""
    from qwen3kd.config.schema import Mode
    from qwen3kd.rollout.engine import Request
    from qwen3kd.rollout.prompts import render_prompt

    def complete(cases: list[tuple[task.Problem, str]]) -> list[str]:
        requests = []
        for i, (p, prefix) in enumerate(cases):
            ids = render_prompt(tokenizer, [{"role": "user", "content": p.question}], Mode.think)
            ids += tokenizer(f"<think>\n{prefix}\n", add_special_tokens=False)["input_ids"]
            requests.append(Request(ids, Mode.think, seed=i, temperature=0.0))
        return [tokenizer.decode(r.response_ids, skip_special_tokens=False) for r in engine.generate(requests)]

    return complete
