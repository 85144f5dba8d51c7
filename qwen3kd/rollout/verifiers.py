"""Rewards of answers, by name (`onpolicy.verifier`): what GRPO trains on, and what every
on-policy run whose prompts carry an "answer" reports (rollout/reward/MODE).

A verifier maps (prompt, rollout) to a reward in [0, 1]. `exact_match` is the demo's grader
(`qwen3kd eval`'s: the last integer of the answer, the thinking excluded, against the prompt's
"answer"), made strict about the mode, so reinforcement learning cannot buy accuracy by breaking
it: an answer that does not have its mode's shape (think: opens and closes its thinking;
no_think: no thinking of its own) earns 0, and in no_think mode only a direct answer (one line)
counts — reasoning written out in the visible answer would be thinking in a mode that has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qwen3kd.config.schema import Mode
from qwen3kd.rollout.engine import Rollout
from qwen3kd.rollout.prompts import Prompt


@dataclass(frozen=True)
class Grader:
    """The tokenizer facts a verifier needs, looked up once."""

    tok: object
    think: tuple[int, int]  # <think>, </think> ids
    empty_block: list[int]  # the ids of "<think>\n\n</think>\n\n" (how a no_think prompt ends)

    @classmethod
    def of(cls, tok) -> Grader:
        return cls(tok, (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")),
                   tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"])


def exact_match(g: Grader, prompt: Prompt, r: Rollout) -> float:
    from qwen3kd.rollout.accuracy import answer_text, final_answer
    from qwen3kd.trainer.onpolicy import compliant

    if prompt.answer is None or not compliant(r, g.think, g.empty_block):
        return 0.0
    text = answer_text(g.tok, r, g.think[1]).strip()
    if r.mode is Mode.no_think and "\n" in text:
        return 0.0
    return float(final_answer(text) == prompt.answer)


VERIFIERS: dict[str, Callable[[Grader, Prompt, Rollout], float]] = {"exact_match": exact_match}
