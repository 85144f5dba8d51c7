"""The demo's task assets (`qwen3kd demo`'s first stage, cached): the train / held-out problems of
the toy task (qwen3kd/demo/task.py), a byte-level BPE tokenizer with Qwen3's chat template, and
the JSONL files the later stages read: truth.jsonl (the teacher's ground truth), prompts.jsonl,
eval.jsonl (the test set), dev.jsonl (the dev curves', the study's dev set), in *recoverable*
gate.jsonl (the teacher gate's problems) and in *scarce* answered.jsonl (the few prompts the teacher
answers for the off-policy data; prompts.jsonl is then the fresh prompts' pool)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from qwen3kd.config.schema import DemoVariant, JobConfig
from qwen3kd.demo import task
from qwen3kd.errors import ConfigError
from qwen3kd.files import write_text_atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the task's text or the teacher's recipe changes what an entry holds
DONE = "DONE"  # written last into a complete cache entry


def cache_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_assets(cfg: JobConfig, cache: Path) -> Path:
    """The assets folder of `cfg.demo`'s settings in `cache`, built unless a complete one is there."""
    from qwen3kd.data.toy_tokenizer import build_toy_tokenizer, default_corpus

    d = cfg.demo
    recoverable, scarce = d.variant is DemoVariant.recoverable, d.variant is DemoVariant.scarce
    spec = {"version": CACHE_VERSION, "seed": d.seed, "train": d.train_problems,
            "prompts": d.prompts, "eval": d.eval_problems, "dev": d.dev_problems,
            "vocab": cfg.model.vocab_size}
    if recoverable:  # (the plain task's key stays what it was: its cache entries hold)
        spec.update(variant=d.variant.value, slip_rate=d.slip_rate, gate=d.gate_problems)
    if scarce:
        spec.update(variant=d.variant.value, answered=d.scarce.answered_prompts, prompts=d.scarce.prompts)
    if d.test_seed is not None:  # (likewise)
        spec.update(test_seed=d.test_seed, dev_seed=d.dev_seed)
    out = cache / f"assets-{cache_key(spec)}"
    if (out / DONE).is_file():
        log.info("demo: assets from the cache (%s)", out)
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    held = d.eval_problems + d.dev_problems
    locked = []  # the test and dev problems, when drawn with seeds of their own
    if d.test_seed is not None:
        for n, seed in ((d.eval_problems, d.test_seed), (d.dev_problems, d.dev_seed)):
            locked += task.split_problems(0, n, seed, exclude=frozenset(locked))[1]
    # scarce: twice the pool, as its prompts must not repeat an answered problem (training
    # problems may repeat: task.split_problems)
    n_prompts = d.scarce.answered_prompts + 2 * d.scarce.prompts if scarce else d.prompts
    train, held_out = task.split_problems(d.train_problems + n_prompts,
                                          (0 if locked else held) + (d.gate_problems if recoverable else 0),
                                          d.seed, exclude=frozenset(locked))
    held_out = locked + held_out
    truth, prompts = train[: d.train_problems], train[d.train_problems:]
    rng = np.random.default_rng([d.seed, 1])  # the slips'
    slips = [task.random_slip(p, rng) if recoverable and i % 2 == 0 and rng.random() < d.slip_rate
             else None for i, p in enumerate(truth)]
    text = task.corpus(train[:3000]) + task.chat_corpus(train[:500]) + default_corpus()
    text += [p.corrected_reasoning(*s)[0] for p, s in zip(truth[:3000], slips, strict=False) if s]
    build_toy_tokenizer(out / "tokenizer", corpus=text, vocab_size=min(376, cfg.model.vocab_size))
    task.write_jsonl(out / "truth.jsonl", [task.conversation(p, "think" if i % 2 == 0 else "no_think", s)
                                           for i, (p, s) in enumerate(zip(truth, slips, strict=True))])
    if scarce:  # the teacher answers the first few; the pool holds none of those problems
        answered = prompts[: d.scarce.answered_prompts]
        prompts = [p for p in prompts[d.scarce.answered_prompts:] if p not in set(answered)][: d.scarce.prompts]
        if len(prompts) < d.scarce.prompts:
            raise ConfigError(f"demo.scarce.prompts={d.scarce.prompts}: only {len(prompts)} fresh prompts were "
                              f"drawn besides the {len(answered)} answered ones; make it smaller")
        task.write_jsonl(out / "answered.jsonl", [task.prompt_line(p) for p in answered])
    task.write_jsonl(out / "prompts.jsonl", [task.prompt_line(p) for p in prompts])
    task.write_jsonl(out / "eval.jsonl", [task.prompt_line(p) for p in held_out[: d.eval_problems]])
    task.write_jsonl(out / "dev.jsonl", [task.prompt_line(p) for p in held_out[d.eval_problems: held]])
    if recoverable:
        task.write_jsonl(out / "gate.jsonl", [task.prompt_line(p) for p in held_out[held:]])
    write_text_atomic(out / "spec.json", json.dumps(spec, indent=1) + "\n")
    write_text_atomic(out / DONE, "")
    return out
