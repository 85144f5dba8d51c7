"""On-policy pieces without an engine: the co-located call order around a training step (with
recording stand-ins, as NeMo-RL tests its colocated choreography), rollout rows and their loss
mask, mode compliance, prompts, the phase plan and the weight-sync mapping inverse."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3kd.config.loader import load_config
from qwen3kd.config.schema import Mode, Phase
from qwen3kd.errors import ConfigError, DataError
from qwen3kd.models.params import count_params
from qwen3kd.rollout.engine import Request, Rollout

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smoke" / "onpolicy-tiny.yaml"


class RecordingEngine:
    def __init__(self, calls):
        self.calls = calls

    def wake_up(self, tags=("weights", "kv_cache")):
        self.calls.append(f"engine.wake_up({','.join(tags)})")

    def sleep(self, keep_weights):
        self.calls.append(f"engine.sleep(keep_weights={keep_weights})")

    def generate(self, requests):
        self.calls.append("engine.generate")
        return [Rollout(r.prompt_ids, [5, 6, 7], [-0.1] * 3, [True] * 3, "stop", r.mode) for r in requests]

    def prompt_logprobs(self, seqs):
        self.calls.append("engine.prompt_logprobs")
        return [[-1.0] * (len(s) - 1) for s in seqs]

    def load_weights(self, weights):
        self.calls.append(f"engine.load_weights({len(list(weights))} tensors)")


class RecordingTeacher:
    def __init__(self, calls):
        self.calls = calls

    def take_timings(self):
        self.calls.append("teacher.take_timings")
        return {}


def _base(a) -> list[str]:
    return ["parallel.tensor=1", f"onpolicy.prompts={a / 'prompts.jsonl'}",
            f"data.path={a / 'train.jsonl'}", f"data.eval_path={a / 'eval.jsonl'}",
            f"data.tokenizer={a / 'tokenizer'}", f"teacher.load={a / 'teacher'}"]


def _trainer(calls, sync_interval, monkeypatch, toy_assets):
    """A Trainer in its on-policy phase whose engine, teacher, model and optimizer record calls."""
    from qwen3kd.trainer.loop import Trainer
    from qwen3kd.trainer.onpolicy import OnPolicySource

    cfg = load_config(CONFIG, [*_base(toy_assets), f"rollout.sync_interval={sync_interval}",
                               "train.global_batch_size=2", "train.micro_batch_size=1"])
    src = OnPolicySource.__new__(OnPolicySource)
    src.cfg, src.first, src.first_step, src.dp, src.dp_rank = cfg, True, 2, 1, 0
    src.engine, src.model, src.group, src.tolerance, src.stale_lp = RecordingEngine(calls), [], None, 1e-3, None
    src.probe, src.think, src.empty_block, src.pad = [[1, 2, 3]], (318, 319), [318, 258, 319, 258], 0
    src.requests = lambda step: [(None, Request([1, 2, 3], Mode.think, 0)),
                                 (None, Request([1, 2, 4], Mode.no_think, 1))]
    src.rewarded, src.grpo = False, False

    def probe_forward():
        calls.append("trainer.probe_forward")
        return [[-1.0, -1.0]]

    src.trainer_logprobs = probe_forward

    def gather(model, cfg_model):
        calls.append("trainer.gather_weights")
        yield "model.norm.weight", torch.ones(4)

    monkeypatch.setattr("qwen3kd.rollout.weight_sync.hf_weights", gather)
    t = Trainer.__new__(Trainer)
    t.cfg, t.phase, t.rollouts, t.teacher = cfg, Phase.onpolicy, src, RecordingTeacher(calls)
    from qwen3kd.checkpoint.training import Progress

    t.progress = Progress(step=2)
    from qwen3kd.trainer.ledger import Ledger

    t.ledger = Ledger(cfg, 1, torch.device("cpu"))

    class Objective:
        def summarise(self, total, prefix):
            return {"train/loss": 0.0, "train/tokens": 6.0}

    t.objectives = {Phase.onpolicy: Objective()}
    def forward_backward(batches):
        calls.append(f"trainer.forward_backward({len(batches)} micro-batches)")
        busy = time.process_time() + 0.05  # CPU time for the ledger to measure (ticks are 10 ms)
        while time.process_time() < busy:
            pass

    t.forward_backward = forward_backward
    t.optimizer_step = lambda: calls.append("trainer.optimizer_step") or (1.0, 1e-3)
    return t


def test_colocated_call_order_around_a_step(megatron_world, monkeypatch, toy_assets):
    calls = []
    t = _trainer(calls, 1, monkeypatch, toy_assets)
    m = t.train_step()
    assert calls == [
        # rollouts: the engine takes the device, answers, scores the probe with these weights, and
        # gives everything back (its weights are replaced after the step)
        "engine.wake_up(kv_cache)", "engine.generate", "engine.prompt_logprobs",
        "engine.sleep(keep_weights=False)",
        # the trainer's step: the teacher's phase and the student's forward-backward (their
        # order: tests/unit/test_teacher_phase.py) (the two 6-token rollouts packed into one
        # row: one micro-batch), then the optimizer
        "trainer.forward_backward(1 micro-batches)", "teacher.take_timings",
        "trainer.optimizer_step",
        # the weight sync: the gather streams into the push, then the probe on both sides
        "engine.wake_up(weights)", "trainer.gather_weights", "engine.load_weights(1 tensors)",
        "engine.wake_up(kv_cache)", "engine.prompt_logprobs", "engine.sleep(keep_weights=True)",
        "trainer.probe_forward",
    ]
    assert m["rollout/probe_gap"] == 0.0 and m["rollout/answers/think"] == 1
    # The ledger: 6N × the packed row's 12 tokens trained, 2N × the 6 answer tokens generated.
    n = count_params(t.cfg.model).active
    assert m["compute/flops/train"] == 6 * n * 12 and m["compute/flops/rollout"] == 2 * n * 6
    assert m["compute/flops"] == 6 * n * 12 + 2 * n * 6 and m["compute/cpu_seconds"] >= 0.04
    assert t.progress.step == 3 and t.progress.consumed_samples == 0  # rollouts use no data rows


def test_between_syncs_the_engine_keeps_its_weights(megatron_world, monkeypatch, toy_assets):
    calls = []
    t = _trainer(calls, 2, monkeypatch, toy_assets)
    t.train_step()  # step 3: (3 - 2) % 2 != 0, no sync
    assert "engine.sleep(keep_weights=True)" in calls and not any("load_weights" in c for c in calls)


def test_a_failing_probe_stops_the_run(megatron_world, monkeypatch, toy_assets):
    from qwen3kd.rollout.engine import RolloutEngineError

    t = _trainer([], 1, monkeypatch, toy_assets)
    t.rollouts.trainer_logprobs = lambda: [[-1.0, -1.5]]  # the engine says -1.0: 0.5 apart
    with pytest.raises(RolloutEngineError, match="differ from the trainer's by up to 0.5"):
        t.train_step()


def test_rollout_row_learns_sampled_response_tokens_only():
    from qwen3kd.trainer.onpolicy import rollout_row

    r = Rollout([1, 2, 3], [10, 11, 12, 13], [0.0] * 4, [True, False, True, True], "stop", Mode.no_think)
    row = rollout_row(r, seq=16)
    assert row.ids.tolist() == [1, 2, 3, 10, 11, 12, 13]
    # Position t predicts token t + 1: the first answer token at position 2; the forced 11 not.
    assert row.mask.tolist() == [0, 0, 1, 0, 1, 1]
    assert set(row.modes.tolist()) == {1}


def test_packed_rollouts_learn_the_same_labels_and_stay_apart():
    from qwen3kd.data.batches import collate, pack_rows
    from qwen3kd.trainer.onpolicy import rollout_row

    rng = np.random.default_rng(0)
    rollouts = []
    for i in range(9):
        p, n = int(rng.integers(3, 12)), int(rng.integers(1, 20))
        resp = [int(x) for x in rng.integers(10, 300, n)]
        sampled = [bool(x) for x in rng.random(n) < 0.8]
        rollouts.append(Rollout(list(range(1, p + 1)), resp, [0.0] * n, sampled, "stop",
                                Mode.think if i % 2 else Mode.no_think))
    seq = 40
    rows = [rollout_row(r, seq) for r in rollouts]
    packed = pack_rows(rows, seq)
    assert len(packed) < len(rows) and all(len(r.ids) <= seq + 1 for r in packed)

    def learned(mbs):  # (label, mode) of every learned position
        out = []
        for mb in mbs:
            m = mb.loss_mask.bool()
            out += list(zip(mb.labels[m].tolist(), mb.modes[m].tolist(), strict=True))
        return sorted(out)

    plain = [collate([r], seq) for r in rows]
    mbs = [collate([r], seq) for r in packed]
    assert learned(mbs) == learned(plain) and len(learned(plain)) == sum(sum(r.sampled) for r in rollouts)
    for mb, row in zip(mbs, packed, strict=True):
        blocked = mb.attention_mask()
        seg = mb.segments[0]
        n = len(row.ids) - 1
        if blocked is None:
            continue
        same = (seg[:n, None] == seg[None, :n]) & torch.ones(n, n, dtype=torch.bool).tril()
        assert torch.equal(~blocked[0, 0, :n, :n], same)  # causal, inside its own rollout only
        starts = np.flatnonzero(np.diff(seg[:n].numpy(), prepend=-1))
        assert (mb.position_ids[0, starts] == 0).all()


def test_mode_compliance(toy_assets):
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.prompts import render_prompt
    from qwen3kd.trainer.onpolicy import compliant

    tok = load_tokenizer(toy_assets / "tokenizer")
    ids = tok.convert_tokens_to_ids
    think = (ids("<think>"), ids("</think>"))
    empty = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    t, n = render_prompt(tok, msgs, Mode.think), render_prompt(tok, msgs, Mode.no_think)
    ok = lambda p, r, m: compliant(Rollout(p, r, [], [], "stop", m), think, empty)  # noqa: E731
    assert ok(t, [think[0], 50, think[1], 51], Mode.think)
    assert not ok(t, [think[0], 50, 51], Mode.think)  # never closed
    assert not ok(t, [50, 51], Mode.think)  # never opened
    assert ok(n, [50, 51], Mode.no_think)
    assert not ok(n, [think[0], 50, think[1]], Mode.no_think)  # thought anyway
    assert not ok(t, [50, 51], Mode.no_think)  # the prompt had no empty think block


def test_prompts_modes_and_errors(tmp_path):
    from qwen3kd.rollout.prompts import load_prompts, prompt_mode

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "system": "s"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "b"}], "mode": "no_think"}) + "\n")
    a, b = load_prompts(f)
    assert a.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]
    assert b.line == 3 and prompt_mode(b, 0, 1.0, 0) is Mode.no_think
    draws = [prompt_mode(a, i, 0.25, 7) for i in range(400)]
    assert draws == [prompt_mode(a, i, 0.25, 7) for i in range(400)]  # seeded
    assert 0.15 < draws.count(Mode.think) / 400 < 0.35
    f.write_text('{"prompt": "ok"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: bad prompt: the last message must be the user's"):
        load_prompts(f)


def test_unshard_inverts_shard():
    from qwen3kd.checkpoint.hf_mapping import shard, unshard

    t = torch.arange(64.0).reshape(8, 8)
    for kind in ("replicated", "column", "row", "swiglu"):
        for size in (1, 2, 4):
            parts = [shard(kind, t, r, size) for r in range(size)]
            assert torch.equal(unshard(kind, parts), t), (kind, size)


def test_phase_plan_and_phase_errors(toy_assets):
    from qwen3kd.config.validate import validate
    from qwen3kd.trainer.phases import onpolicy_kd, phase_plan, total_steps

    base = _base(toy_assets)
    cfg = load_config(CONFIG, base)
    validate(cfg, world_size=1)
    assert phase_plan(cfg) == [(Phase.offpolicy, 0, 2), (Phase.onpolicy, 2, 5)] and total_steps(cfg) == 5
    kd = onpolicy_kd(cfg)
    assert kd.kind.value == "reverse_kl" and kd.temperature == 1.0 and kd.alpha == 1.0
    bad = {
        "phases=[onpolicy,offpolicy]": "offpolicy comes before onpolicy",
        "onpolicy.steps=0": "onpolicy.steps must be >= 1",
        "onpolicy.prompts=/nope.jsonl": "onpolicy.prompts: file not found: /nope.jsonl",
        "onpolicy.think_ratio=1.5": "onpolicy.think_ratio must be in [0, 1]",
        "rollout.max_new_tokens=128": "rollout.max_new_tokens=128 must be in 1..train.seq_length",
        "rollout.stop_thinking_text=done": "must contain </think>",
        "model.head_dim=16": "head_dim=16: vLLM on a CPU supports head sizes",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            validate(load_config(CONFIG, [*base, override]), world_size=1)
    # An on-policy-only run needs no off-policy data.
    only = load_config(CONFIG, [*base, "phases=[onpolicy]", "data.path=/nope"])
    validate(only, world_size=1)
    assert phase_plan(only) == [(Phase.onpolicy, 0, 3)]
    assert np.isfinite(total_steps(only))
