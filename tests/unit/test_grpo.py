"""GRPO (onpolicy.objective=grpo): advantages of a hand-computed group, zero gradient from a group
whose rewards are all equal (through rollout rows, packing and the objective's loss), the loss's
gradient against the REINFORCE expectation by Monte Carlo on a tiny categorical policy, the
exact-match verifier's mode rules, and the groups and common random numbers of the requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3kd.config.loader import load_config
from qwen3kd.config.schema import Mode
from qwen3kd.losses.policy_gradient import group_advantages, policy_gradient_loss
from qwen3kd.rollout.engine import Rollout

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke" / "onpolicy-tiny.yaml"


def test_advantages_of_hand_computed_groups():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = group_advantages(rewards, eps=1e-6)
    # Group 1: mean 1/4, unbiased std √((3/4)² + 3·(1/4)²)/3) = 1/2 → (1 − 1/4)/(1/2) = 3/2, …
    assert adv[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    # Group 2: mean 1/2, std √(4 · 1/4 / 3) = 1/√3 → ±(1/2)·√3.
    assert adv[1].tolist() == pytest.approx([3**0.5 / 2] * 2 + [-(3**0.5) / 2] * 2, abs=1e-5)
    assert adv[2].tolist() == [0.0] * 4  # all equal: no signal
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4, 1), eps=1e-6)


class _Policy(torch.nn.Module):
    """A tiny next-token model: embedding → linear, per-token cross-entropy like megatron's."""

    def __init__(self, vocab: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)

    def forward(self, tokens, labels):
        logits = self.out(self.emb(tokens))
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def _gradient(rewards: list[float]) -> list[torch.Tensor]:
    """The GRPO objective's gradient for one group of rollouts with these rewards, through the
    trainer's path: advantages (OnPolicySource.grade) → rollout rows → packing → micro-batch →
    GRPOObjective.loss."""
    from qwen3kd.data.batches import collate, pack_rows
    from qwen3kd.trainer.objectives import GRPOObjective
    from qwen3kd.trainer.onpolicy import OnPolicySource, rollout_row

    rng = np.random.default_rng(1)
    rollouts = [Rollout([1, 2, 3], [int(x) for x in rng.integers(4, 32, 5)], [0.0] * 5, [True] * 5,
                        "stop", Mode.think) for _ in rewards]
    src = OnPolicySource.__new__(OnPolicySource)
    src.cfg = load_config(CONFIG, ["onpolicy.objective=grpo", f"onpolicy.group_size={len(rewards)}",
                                   "parallel.tensor=1", "onpolicy.batch_size=4"], check_files=False)
    src.grpo, src.grader = True, None
    src.verifier = lambda grader, prompt, r: rewards[rollouts.index(r)]
    src.grade([None] * len(rollouts), rollouts)
    mb = collate(pack_rows([rollout_row(r, 40) for r in rollouts], 40), 40)
    policy = _Policy()
    ce = policy(mb.tokens, mb.labels)
    loss, n, _ = GRPOObjective.loss(mb.loss_mask, mb.advantages, mb.modes, ce)
    assert int(n) == 5 * len(rewards)
    loss.backward()
    return [p.grad for p in policy.parameters()]


def test_a_group_with_equal_rewards_gives_zero_gradient():
    assert all(torch.count_nonzero(g) == 0 for g in _gradient([1.0, 1.0, 1.0, 1.0]))
    assert all(torch.count_nonzero(g) == 0 for g in _gradient([0.0, 0.0, 0.0, 0.0]))
    assert any(torch.count_nonzero(g) > 0 for g in _gradient([1.0, 0.0, 0.0, 1.0]))


def test_the_loss_gradient_is_the_reinforce_estimator():
    """On a categorical policy π = softmax(θ) over 5 actions with rewards r: the gradient of the
    loss over M sampled actions, A = r − b, divided by M, converges to −∇θ E_π[r] (the baseline
    b adds nothing in expectation). Checked within 5 Monte Carlo standard errors, per component."""
    theta = torch.tensor([0.3, -0.2, 0.9, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.0, 1.0, 0.3, 0.0, 2.0], dtype=torch.float64)
    b, m = 0.5, 200_000
    pi = torch.softmax(theta, 0)
    exact = torch.autograd.grad(-(pi * r).sum(), theta)[0]
    a = torch.multinomial(pi.detach(), m, replacement=True, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(theta, 0)[a]
    loss = policy_gradient_loss(logp, r[a] - b, torch.ones(m, dtype=torch.float64)) / m
    mc = torch.autograd.grad(loss, theta)[0]
    # Per-sample gradients −(r_a − b)(e_a − π): their spread gives the standard error.
    per = -(r[a] - b)[:, None] * (torch.nn.functional.one_hot(a, 5).double() - pi.detach())
    se = per.std(0) / m**0.5
    assert ((mc - exact).abs() <= 5 * se).all(), (mc, exact, se)
    assert (exact.abs() > 20 * se).any()  # a real signal, not noise around zero


def test_exact_match_rewards_the_answer_in_its_mode(toy_assets):
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.prompts import Prompt, render_prompt
    from qwen3kd.rollout.verifiers import Grader, exact_match

    tok = load_tokenizer(toy_assets / "tokenizer")
    msgs = [{"role": "user", "content": "What is 12 + 3?"}]
    g, prompt = Grader.of(tok), Prompt(msgs, None, 1, "15")
    cases = [  # (mode, answer, reward)
        (Mode.think, "<think>\nones: 2 + 3 = 5\n</think>\n\n12 + 3 = 15<|im_end|>", 1.0),
        (Mode.think, "<think>\nones: 2 + 3 = 5\n</think>\n\n12 + 3 = 16<|im_end|>", 0.0),
        (Mode.think, "12 + 3 = 15<|im_end|>", 0.0),  # right, but it did not think
        (Mode.no_think, "12 + 3 = 15<|im_end|>", 1.0),
        (Mode.no_think, "ones: 2 + 3 = 5\n12 + 3 = 15<|im_end|>", 0.0),  # reasoning in the open
        (Mode.no_think, "<think>\nhm\n</think>\n\n12 + 3 = 15<|im_end|>", 0.0),  # breaks its mode
    ]
    for mode, text, reward in cases:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        r = Rollout(render_prompt(tok, msgs, mode), ids, [0.0] * len(ids), [True] * len(ids),
                    "stop", mode)
        assert exact_match(g, prompt, r) == reward, (mode, text)
    no_answer = Prompt(msgs, None, 1, None)
    assert exact_match(g, no_answer, r) == 0.0


def test_groups_share_prompt_and_mode_and_both_arms_draw_the_same(toy_assets):
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.trainer.onpolicy import OnPolicySource

    tok = load_tokenizer(toy_assets / "tokenizer")

    def source(objective: str, dp_rank: int = 0) -> OnPolicySource:
        s = OnPolicySource.__new__(OnPolicySource)
        s.cfg = load_config(CONFIG, [f"onpolicy.prompts={toy_assets / 'prompts.jsonl'}",
                                     f"onpolicy.objective={objective}", "onpolicy.group_size=4",
                                     "onpolicy.batch_size=16", "parallel.tensor=1"],
                            check_files=False)
        s.tok, s.dp, s.dp_rank, s.first_step = tok, 2, dp_rank, 2
        s.prompts = s._prompts()
        s.order = np.random.default_rng(s.cfg.train.seed).permutation(len(s.prompts))
        return s

    kd, grpo = source("kd").requests(3), source("grpo").requests(3)
    assert [(p.line, q.prompt_ids, q.mode, q.seed) for p, q in kd] == \
        [(p.line, q.prompt_ids, q.mode, q.seed) for p, q in grpo]  # common random numbers
    assert len(kd) == 8  # 16 rollouts over 2 replicas
    for k in range(0, 8, 4):
        group = kd[k: k + 4]
        assert len({(p.line, q.mode) for p, q in group}) == 1 and len({q.seed for _, q in group}) == 4
    assert kd[0][0].line != kd[4][0].line
    other = source("kd", dp_rank=1).requests(3)  # the other replica: other prompts
    assert not {p.line for p, _ in other} & {p.line for p, _ in kd}
