"""`qwen3kd generate`: the teacher answers a prompt file; the answers are off-policy training data.

Each prompt line is answered in its own mode (the line's "mode", else a seeded draw with
`generate.think_ratio`), or in both modes with `generate.both_modes` (a line's fixed mode still
wins: whoever wrote it said that prompt is answered that way). Qwen3's off-policy phase trains on
teacher answers in both modes (Qwen3 report, strong-to-weak distillation).

Output: one JSONL line per kept answer, in the format `qwen3kd.data.chat.load_chat` reads,

    {"messages": [...prompt, {"role": "assistant", "content": ANSWER,
                              "reasoning_content": THINKING}],
     "mode": "think" | "no_think", "prompt_line": N, "budget_cut": bool}

(no "reasoning_content" in no_think mode). The work is split into shards of `generate.shard_size`
prompts, in file order. A shard is written to `<output>.shards/shard-NNNNN.jsonl` (atomically)
only when all of its answers are in, so a run killed midway and started again skips the shards
that exist and answers each prompt exactly once. Request seeds are a function of rollout.seed, the
prompt's index and the mode, so a resumed run asks for the same samples. When every shard exists
they are concatenated into `<output>` (atomically), and `<output>.summary.json` gets the counts.

Answers the teacher did not finish (max_new_tokens reached before the end of turn) are dropped and
counted: a truncated answer would teach the student to stop mid-thought or never end its turn.
So are malformed ones (think mode without exactly one `</think>`; think tags in a no_think
answer), and prompts too long to leave room for an answer (see `max_model_len`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qwen3kd.config.schema import JobConfig, Mode
from qwen3kd.data.chat import MODES
from qwen3kd.errors import ConfigError, DataError
from qwen3kd.files import write_text_atomic
from qwen3kd.rollout.engine import Request, Rollout
from qwen3kd.rollout.prompts import Prompt, load_prompts, prompt_mode, render_prompt

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MANIFEST = "generate.json"


# ---- configuration --------------------------------------------------------------------------
def hf_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.load: cannot read {path}: {e}") from None


def check_generate(cfg: JobConfig) -> dict:
    """The checks `qwen3kd generate` needs beyond `validate` (all before an engine starts);
    returns the teacher's Hugging Face config.json."""
    from qwen3kd.config.validate import check_rollout

    t, g = cfg.teacher, cfg.generate
    if t is None or not t.load:
        raise ConfigError("teacher.load: qwen3kd generate needs the teacher's Hugging Face folder")
    if not Path(t.load).is_dir():
        raise ConfigError(f"teacher.load: directory not found: {t.load}")
    if not (Path(t.load) / "config.json").is_file():
        # vLLM runs Hugging Face folders only (`qwen3kd convert` makes one from Megatron).
        raise ConfigError(f"teacher.load: {t.load} is not a Hugging Face folder (no config.json); "
                          "convert a Megatron checkpoint with `qwen3kd convert SRC DST --to hf`")
    if not g.prompts:
        raise ConfigError("generate.prompts is not set (a JSONL file of prompts)")
    if not Path(g.prompts).is_file():
        raise ConfigError(f"generate.prompts: file not found: {g.prompts}")
    if not 0 <= g.think_ratio <= 1:
        raise ConfigError(f"generate.think_ratio must be in [0, 1], got {g.think_ratio}")
    if g.shard_size < 1:
        raise ConfigError(f"generate.shard_size must be >= 1, got {g.shard_size}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several ranks would each answer every shard; the engine's own parallelism is
        # rollout.tensor_parallel, inside this one process.
        raise ConfigError("qwen3kd generate runs as one process: launch it without torchrun "
                          "(the engine's tensor parallelism is rollout.tensor_parallel)")
    hf = hf_config(Path(t.load))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    check_rollout(cfg, head_dim)
    return hf


def max_model_len(cfg: JobConfig, hf: dict) -> int:
    """The engine's longest sequence: a prompt of up to train.seq_length tokens (a longer one
    leaves no answer token in a training row, so it is skipped) plus a full answer; never more
    than the teacher's positions."""
    want = cfg.train.seq_length + cfg.rollout.max_new_tokens
    return min(want, int(hf.get("max_position_embeddings") or want))


def fits(prompt_len: int, cfg: JobConfig, max_len: int) -> bool:
    # The engine's second (post-budget) pass prompts with prompt + thinking + inserted text, which
    # stays below prompt + max_new_tokens; vLLM rejects the whole batch for one prompt that is
    # too long, so a prompt is only sent when a full answer fits.
    return prompt_len <= cfg.train.seq_length and prompt_len + cfg.rollout.max_new_tokens <= max_len


# ---- requests -------------------------------------------------------------------------------
def request_modes(prompt: Prompt, index: int, cfg: JobConfig) -> list[Mode]:
    g = cfg.generate
    if g.both_modes and prompt.mode is None:
        return list(MODES)
    return [prompt_mode(prompt, index, g.think_ratio, cfg.rollout.seed)]


def request_seed(seed: int, index: int, mode: Mode) -> int:
    """A function of the run's seed, the prompt's index in the file and the mode only, so a
    resumed run (or another shard size) asks for the same sample. Below 2**31 - 1: the engine
    seeds its post-budget pass with seed + 1."""
    return int(np.random.default_rng([seed, index, MODES.index(mode)]).integers(2**31 - 1))


def render(tok, prompt: Prompt, mode: Mode, path: str) -> list[int]:
    try:
        return render_prompt(tok, prompt.messages, mode)
    except Exception as e:  # jinja's TemplateError, raise_exception() in the template
        raise DataError(f"{path}:{prompt.line}: the chat template failed: {e}") from None


# ---- answers --------------------------------------------------------------------------------
def split_response(text: str, mode: Mode) -> tuple[str | None, str]:
    """(reasoning, answer) of a finished response, the end-of-turn token removed. Think mode:
    `<think>\\n…\\n</think>\\n\\nANSWER` (the opening tag may be in the prompt instead, as some
    templates put it there); the reasoning keeps any text the thinking budget inserted before
    `</think>`. Whitespace is trimmed as Qwen3's chat template trims it when it renders the answer
    back for training. ValueError when the tags are not where the mode says."""
    if mode is Mode.no_think:
        if THINK_OPEN in text or THINK_CLOSE in text:
            raise ValueError("think tags in a no_think answer")
        return None, text
    if text.count(THINK_CLOSE) != 1:
        raise ValueError(f"think mode: expected one {THINK_CLOSE}, found {text.count(THINK_CLOSE)}")
    head, _, answer = text.partition(THINK_CLOSE)
    head = head.lstrip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN):]
    if THINK_OPEN in head or THINK_OPEN in answer:
        raise ValueError(f"think mode: misplaced {THINK_OPEN}")
    return head.strip("\n"), answer.lstrip("\n")


@dataclass
class ModeCounts:
    answered: int = 0
    truncated: int = 0  # max_new_tokens reached before the end of turn: dropped
    malformed: int = 0  # think tags not where the mode puts them: dropped
    prompt_too_long: int = 0  # never sent (see `fits`)
    budget_cut: int = 0  # answered, with the thinking cut by rollout.thinking_budget


@dataclass
class Counts:
    modes: dict[str, ModeCounts] = field(
        default_factory=lambda: {m.value: ModeCounts() for m in MODES})

    def add(self, other: Counts) -> None:
        for m, c in other.modes.items():
            for k, v in asdict(c).items():
                setattr(self.modes[m], k, getattr(self.modes[m], k) + v)

    def to_dict(self) -> dict:
        return {m: asdict(c) for m, c in self.modes.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Counts:
        return cls({m: ModeCounts(**d[m]) for m in d})


def answer_line(prompt: Prompt, ro: Rollout, tok, eot: int) -> dict:
    """The output record of a finished rollout; ValueError for a malformed one."""
    text = tok.decode(ro.response_ids[:-1], skip_special_tokens=False,
                      clean_up_tokenization_spaces=False)
    reasoning, answer = split_response(text, ro.mode)
    msg = {"role": "assistant", "content": answer}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return {"messages": [*prompt.messages, msg], "mode": ro.mode.value, "prompt_line": prompt.line,
            "budget_cut": ro.budget_cut}


# ---- one shard ------------------------------------------------------------------------------
@dataclass
class ShardResult:
    lines: list[str]
    counts: Counts
    sampled_tokens: int  # tokens the engine generated (for the progress line)


def run_shard(engine, tok, prompts: list[Prompt], first: int, cfg: JobConfig, max_len: int,
              eot: int) -> ShardResult:
    """Answer prompts[first : first + len(prompts)] (indices are positions in the whole file)."""
    counts, pending = Counts(), []
    for i, p in enumerate(prompts, first):
        for mode in request_modes(p, i, cfg):
            ids = render(tok, p, mode, cfg.generate.prompts)
            if fits(len(ids), cfg, max_len):
                pending.append((p, Request(ids, mode, request_seed(cfg.rollout.seed, i, mode))))
            else:
                counts.modes[mode.value].prompt_too_long += 1
    rollouts = engine.generate([r for _, r in pending]) if pending else []
    lines, sampled = [], 0
    for (p, _), ro in zip(pending, rollouts, strict=True):
        c = counts.modes[ro.mode.value]
        sampled += sum(ro.sampled)
        if ro.finish_reason != "stop" or not ro.response_ids or ro.response_ids[-1] != eot:
            c.truncated += 1
            continue
        try:
            line = answer_line(p, ro, tok, eot)
        except ValueError as e:
            c.malformed += 1
            log.debug("%s:%d (%s): dropped: %s", cfg.generate.prompts, p.line, ro.mode.value, e)
            continue
        c.answered += 1
        c.budget_cut += ro.budget_cut
        lines.append(json.dumps(line, ensure_ascii=False))
    return ShardResult(lines, counts, sampled)


# ---- files ----------------------------------------------------------------------------------
def shard_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def shard_path(output: Path, i: int) -> Path:
    return shard_dir(output) / f"shard-{i:05d}.jsonl"


def counts_path(output: Path, i: int) -> Path:
    return shard_dir(output) / f"shard-{i:05d}.counts.json"


def fingerprint(cfg: JobConfig) -> dict:
    """What decides a shard's content. A resume with any of it changed would mix two datasets
    (or answer some prompts twice), so it is refused."""
    r = cfg.rollout
    digest = hashlib.sha256()
    with open(cfg.generate.prompts, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "generate.prompts (sha256)": digest.hexdigest(),
        "generate.shard_size": cfg.generate.shard_size,
        "generate.both_modes": cfg.generate.both_modes,
        "generate.think_ratio": cfg.generate.think_ratio,
        "teacher.load": str(Path(cfg.teacher.load).resolve()),
        "train.seq_length": cfg.train.seq_length,
        **{f"rollout.{k}": getattr(r, k) for k in (
            "temperature", "top_p", "top_k", "max_new_tokens", "seed", "thinking_budget",
            "stop_thinking_text")},
        "rollout.dtype": r.dtype.value,
        "data.end_of_turn": cfg.data.end_of_turn,
    }


def check_manifest(output: Path, fp: dict) -> None:
    """Write the shards' settings on the first run; refuse to resume under other settings."""
    path = shard_dir(output) / MANIFEST
    if not path.is_file():
        shard_dir(output).mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(fp, indent=1) + "\n")
        return
    old = json.loads(path.read_text())
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fp.items() if old.get(k) != v]
    if changed:
        raise ConfigError(f"generate.output: {shard_dir(output)} holds shards made with other "
                          f"settings ({'; '.join(changed)}); set another generate.output or "
                          "delete that folder")


def concatenate(parts: list[Path], output: Path) -> None:
    """Stream the shards into `<output>.tmp`, then rename it: readers never see a partial file
    (as files.write_text_atomic, without holding the whole dataset in memory)."""
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    os.replace(tmp, output)


def write_shard(output: Path, i: int, result: ShardResult) -> None:
    # Counts first: the .jsonl is the mark of a complete shard, so it is the last file written.
    write_text_atomic(counts_path(output, i), json.dumps(result.counts.to_dict()) + "\n")
    write_text_atomic(shard_path(output, i), "".join(line + "\n" for line in result.lines))


def read_counts(output: Path, i: int) -> Counts:
    try:
        return Counts.from_dict(json.loads(counts_path(output, i).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{counts_path(output, i)}: unreadable ({e}); delete "
                        f"{shard_path(output, i)} to generate that shard again") from None


# ---- progress -------------------------------------------------------------------------------
class Progress:
    """One INFO line per shard: where the run is, its speed this session, and the time left."""

    def __init__(self, n_shards: int, n_prompts: int, done_prompts: int):
        self.n_shards, self.n_prompts, self.done = n_shards, n_prompts, done_prompts
        self.start, self.new_prompts, self.tokens = time.perf_counter(), 0, 0

    def shard_done(self, i: int, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.new_prompts += prompts
        self.tokens += tokens
        # Rates from this session only: shards found on disk took no time here.
        took = max(time.perf_counter() - self.start, 1e-9)
        eta = (self.n_prompts - self.done) * took / max(self.new_prompts, 1)
        log.info("shard %d/%d: %d/%d prompts done, %.1f tokens/s, ETA %s", i + 1, self.n_shards,
                 self.done, self.n_prompts, self.tokens / took,
                 datetime.timedelta(seconds=round(eta)))


# ---- the command ----------------------------------------------------------------------------
def start_engine(cfg: JobConfig, tok, max_len: int):
    from qwen3kd.rollout.vllm_engine import VllmEngine

    # In this process (no torch.distributed group of ours to protect): vLLM starts ~16 s sooner,
    # and a killed run leaves no engine process behind.
    return VllmEngine(cfg.teacher.load, tok, cfg.rollout, max_model_len=max_len,
                      end_of_turn=cfg.data.end_of_turn, in_process=True)


def load_teacher_tokenizer(cfg: JobConfig):
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.trainer.data import tokenizer_path

    tok = load_tokenizer(tokenizer_path(cfg.teacher.tokenizer, cfg.teacher.load,
                                        "teacher.tokenizer", "teacher.load"))
    eot = tok.convert_tokens_to_ids(cfg.data.end_of_turn)
    if eot is None or eot == tok.unk_token_id:
        raise ConfigError(f"data.end_of_turn={cfg.data.end_of_turn!r} is not a token of the "
                          "teacher's tokenizer")
    if not tok.chat_template:
        raise ConfigError("teacher.tokenizer: the tokenizer has no chat template")
    return tok, int(eot)


def finish(cfg: JobConfig, output: Path, n_shards: int, n_prompts: int) -> Counts:
    """Concatenate the shards into the output and write the summary; returns the totals."""
    total = Counts()
    for i in range(n_shards):
        total.add(read_counts(output, i))
    concatenate([shard_path(output, i) for i in range(n_shards)], output)
    summary = {"output": str(output), "prompts": n_prompts, "shards": n_shards,
               "lines": sum(c.answered for c in total.modes.values()), "modes": total.to_dict()}
    write_text_atomic(output.with_name(output.name + ".summary.json"),
                      json.dumps(summary, indent=1) + "\n")
    for mode, c in total.modes.items():
        log.info("%s: %d answered (%d with the thinking cut by the budget); dropped: %d truncated "
                 "at rollout.max_new_tokens, %d malformed, %d prompts too long", mode, c.answered,
                 c.budget_cut, c.truncated, c.malformed, c.prompt_too_long)
    if not summary["lines"]:
        log.warning("every answer was dropped: see the counts above and %s", output.name + ".summary.json")
    log.info("wrote %d lines to %s", summary["lines"], output)
    return total


def run_generate(cfg: JobConfig, engine_factory: Callable | None = None) -> Counts:
    """The whole command; `engine_factory(cfg, tokenizer, max_model_len)` replaces vLLM in tests."""
    from qwen3kd.faults import maybe_kill
    from qwen3kd.stop import StopRequested, StopSignal

    stop = StopSignal(cfg.train.exit_after_minutes)  # before the engine starts (minutes)
    hf = check_generate(cfg)
    prompts = load_prompts(cfg.generate.prompts)
    tok, eot = load_teacher_tokenizer(cfg)
    max_len = max_model_len(cfg, hf)
    output, size = Path(cfg.generate.output), cfg.generate.shard_size
    n_shards = -(-len(prompts) // size)
    check_manifest(output, fingerprint(cfg))
    todo = [i for i in range(n_shards) if not shard_path(output, i).is_file()]
    done_prompts = len(prompts) - sum(len(prompts[i * size:(i + 1) * size]) for i in todo)
    log.info("%s: %d prompts in %d shards of %d; %d shards to generate, %d already written "
             "(engine max_model_len %d)", cfg.generate.prompts, len(prompts), n_shards, size,
             len(todo), n_shards - len(todo), max_len)
    if todo:
        engine = (engine_factory or start_engine)(cfg, tok, max_len)
        progress = Progress(n_shards, len(prompts), done_prompts)
        try:
            for i in todo:
                chunk = prompts[i * size:(i + 1) * size]
                result = run_shard(engine, tok, chunk, i * size, cfg, max_len, eot)
                write_shard(output, i, result)
                progress.shard_done(i, len(chunk), result.sampled_tokens)
                # The engine's processes die with this one, as in a crash of the node.
                maybe_kill("after_shard", i, before=getattr(engine, "kill", None))
                if stop.local() and i != todo[-1]:  # one process: no ranks to agree with
                    raise StopRequested(f"stopped after shard {i} ({stop.local()}); the shards "
                                        "written are complete: the same command continues")
        finally:
            engine.close()
    return finish(cfg, output, n_shards, len(prompts))
