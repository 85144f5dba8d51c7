"""Chat data for distillation: JSONL conversations → token ids with a loss mask on the answers.

One line is one conversation, in either form
    {"messages": [{"role": "user", "content": …}, {"role": "assistant", "content": …,
                   "reasoning_content": …}, …], "mode": "think" | "no_think"}
    {"prompt": …, "response": …, "reasoning": …, "system": …, "mode": …}
Rendering goes through the tokenizer's own chat template (`apply_chat_template`, with
`enable_thinking` from the sample's mode), so a real Qwen3 tokenizer folder works as it is.

Every assistant turn becomes one training sample: its prompt is the conversation before it,
rendered with the generation prompt exactly as at inference (Qwen3's template strips earlier
turns' thinking from the history), and its answer is what the model generates after that prompt,
up to and including the end-of-turn token. Training all turns of one rendering instead would teach
a thinking model to answer earlier turns without thinking. A turn's mode: no_think when the sample
is (the hard switch wins), otherwise the last `/think` or `/no_think` in a user message so far
(Qwen3's soft switch), otherwise think.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3kd.config.schema import BadLine, DataConfig, Mode, Overlong
from qwen3kd.errors import DataError

log = logging.getLogger(__name__)

MODES = (Mode.think, Mode.no_think)  # a mode's id is its index here
ROLES = ("system", "user", "assistant", "tool")
_SWITCH = re.compile(r"/(no_think|think)\b")


@dataclass
class ChatSample:
    ids: np.ndarray  # [n] int32: prompt then answer
    prompt_len: int  # the answer starts at ids[prompt_len]
    mode: int  # index into MODES
    line: int  # 1-based line in the source file
    turn: int  # index of the assistant message in the conversation
    # [n − prompt_len] bool: which answer tokens are learned; None: all of them. False on the
    # tokens of the turn's `no_loss` spans.
    learned: np.ndarray | None = None


@dataclass
class LoadStats:
    lines: int = 0
    samples: int = 0
    skipped_lines: int = 0  # malformed, with data.bad_line=skip
    truncated: int = 0
    dropped: int = 0  # over-length with data.overlong=drop, or no answer token left in the window

    def describe(self) -> str:
        return (f"{self.lines} conversations → {self.samples} samples; "
                f"{self.skipped_lines} malformed lines skipped, {self.truncated} truncated, "
                f"{self.dropped} dropped as over-length")


def _messages(obj, default_mode: Mode) -> tuple[list[dict], Mode]:
    """The conversation and mode of one parsed line; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    mode = obj.get("mode", default_mode.value)
    if mode not in (m.value for m in MODES):
        raise ValueError(f"mode must be 'think' or 'no_think', got {mode!r}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
    elif "prompt" in obj and "response" in obj:
        msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
        answer = {"role": "assistant", "content": obj["response"]}
        if obj.get("reasoning"):
            answer["reasoning_content"] = obj["reasoning"]
        msgs += [{"role": "user", "content": obj["prompt"]}, answer]
    else:
        raise ValueError("expected 'messages', or 'prompt' and 'response'")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: 'role' must be one of {', '.join(ROLES)}")
        for key in ("content", "reasoning_content"):
            if key in m and not isinstance(m[key], str):
                raise ValueError(f"message {i}: '{key}' must be a string")
        spans = m.get("no_loss", [])
        if not isinstance(spans, list) or not all(isinstance(x, str) and x for x in spans):
            raise ValueError(f"message {i}: 'no_loss' must be a list of non-empty strings")
        if spans and m["role"] != "assistant":
            raise ValueError(f"message {i}: 'no_loss' belongs on an assistant message")
        if "content" not in m:
            raise ValueError(f"message {i}: no 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant message to learn from")
    return msgs, Mode(mode)


def turn_mode(msgs: list[dict], turn: int, sample_mode: Mode) -> Mode:
    if sample_mode is Mode.no_think:
        return Mode.no_think
    for m in reversed(msgs[:turn]):
        if m["role"] == "user":
            found = _SWITCH.findall(m["content"])
            if found:
                return Mode(found[-1])
    return Mode.think


class ChatRenderer:
    """Renders one conversation into samples with the tokenizer's chat template."""

    def __init__(self, tokenizer, end_of_turn: str):
        self.tok = tokenizer
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        if eot is None or eot == tokenizer.unk_token_id:
            raise DataError(f"data.end_of_turn={end_of_turn!r} is not a token of the tokenizer")
        if not tokenizer.chat_template:
            raise DataError("the tokenizer has no chat template (data.tokenizer)")
        self.eot = int(eot)

    def _render(self, msgs, generation_prompt: bool, thinking: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                            enable_thinking=thinking)

    def texts(self, msgs: list[dict], mode: Mode) -> list[tuple[int, str, str, Mode, list]]:
        """Per assistant turn: (its index, the prompt text, the answer text, its mode, the
        character ranges of its `no_loss` spans in the answer text)."""
        thinking = mode is Mode.think
        out = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if not thinking and m.get("reasoning_content", "").strip():
                raise ValueError(f"assistant message {i} has reasoning_content but the sample's "
                                 "mode is no_think")
            try:
                prompt = self._render(msgs[:i], True, thinking)
                full = self._render(msgs[: i + 1], False, thinking)
            except Exception as e:  # jinja's TemplateError, raise_exception() in the template
                raise ValueError(f"assistant message {i}: the chat template failed: {e}") from None
            if not full.startswith(prompt):
                raise ValueError(f"assistant message {i}: the chat template renders the "
                                 "conversation differently from its generation prompt")
            answer = full[len(prompt):]
            out.append((i, prompt, answer, turn_mode(msgs, i, mode), _spans(m, i, answer)))
        return out

    def encode(self, texts: list[str], offsets: bool = False):
        """Token ids of many texts in one call (the fast tokenizer's batch path); with `offsets`
        also each token's character range."""
        if not texts:
            return ([], []) if offsets else []
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
        return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]

    def sample(self, turn: int, mode: Mode, prompt: list[int], answer: list[int], line: int,
               spans: list[tuple[int, int]] = (), offsets: list[tuple[int, int]] | None = None) -> ChatSample:
        if self.eot not in answer:
            raise ValueError(f"assistant message {turn}: no end-of-turn token "
                             f"(data.end_of_turn) after the answer")
        answer = answer[: answer.index(self.eot) + 1]  # the template's trailing newline is not generated
        ids = np.asarray(prompt + answer, dtype=np.int32)
        learned = None
        if spans:
            # A token that overlaps a span, even in part, is not learned.
            learned = np.array([not any(a < end and start < b for start, end in spans)
                                for a, b in offsets[: len(answer)]], dtype=bool)
        return ChatSample(ids, len(ids) - len(answer), MODES.index(mode), line, turn, learned)


def _spans(m: dict, i: int, answer: str) -> list[tuple[int, int]]:
    """The character ranges, in the rendered answer text, of the message's `no_loss` spans: each
    is a substring of its content or reasoning, found once (its first occurrence in the answer)."""
    out = []
    for span in m.get("no_loss", []):
        at = answer.find(span)
        if at < 0:
            raise ValueError(f"assistant message {i}: no_loss span {span[:40]!r} is not in its "
                             f"rendered text")
        out.append((at, at + len(span)))
    return out


def render_lines(lines: list[tuple[int, str]], renderer: ChatRenderer, cfg: DataConfig,
                 max_tokens: int, vocab_size: int, path, stats: LoadStats) -> list[list[ChatSample]]:
    """Numbered JSONL lines (blank ones left out) → per line, its samples with the over-length
    policy applied (`max_tokens` = seq_length + 1: inputs and the last label), counted in `stats`.
    A malformed line is a DataError naming `path` and the line, or is skipped and counted
    (data.bad_line=skip). The texts of all lines are encoded in one batch."""
    parsed, texts = [], []
    for n, text in lines:
        stats.lines += 1
        try:
            turns = renderer.texts(*_messages(json.loads(text), cfg.default_mode))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            parsed.append((n, e))
            continue
        parsed.append((n, turns))
        texts += [t for _, prompt, answer, _, _ in turns for t in (prompt, answer)]
    # Character offsets only when a span needs them (they cost the batch encode ~20 %).
    with_spans = any(spans for _, turns in parsed if not isinstance(turns, Exception) for *_, spans in turns)
    encoded = renderer.encode(texts, offsets=with_spans)
    ids, offsets = (iter(encoded[0]), iter(encoded[1])) if with_spans else (iter(encoded), None)
    out = []
    for n, turns in parsed:
        try:
            if isinstance(turns, Exception):
                raise turns
            samples = []
            for turn, _, _, mode, spans in turns:
                p, a = next(ids), next(ids)
                off = None
                if offsets is not None:
                    next(offsets)
                    off = next(offsets)
                samples.append(renderer.sample(turn, mode, p, a, n, spans, off))
            for s in samples:
                if s.ids.max(initial=0) >= vocab_size:
                    raise ValueError(f"token id {int(s.ids.max())} >= model.vocab_size={vocab_size}")
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            if cfg.bad_line is BadLine.skip:
                stats.skipped_lines += 1
                log.debug("%s:%d: skipped: %s", path, n, e)
                out.append([])
                continue
            raise DataError(f"{path}:{n}: bad sample: {e}") from None
        kept = []
        for s in samples:
            if len(s.ids) > max_tokens:
                # Truncating needs at least one answer token left to learn from.
                if cfg.overlong is Overlong.drop or s.prompt_len >= max_tokens:
                    stats.dropped += 1
                    continue
                s.ids = s.ids[:max_tokens]
                if s.learned is not None:
                    s.learned = s.learned[: max_tokens - s.prompt_len]
                stats.truncated += 1
            kept.append(s)
        stats.samples += len(kept)
        out.append(kept)
    return out


def load_chat(path: Path, tokenizer, cfg: DataConfig, max_tokens: int,
              vocab_size: int) -> tuple[list[ChatSample], LoadStats]:
    """Every sample of a JSONL file, in memory (`render_lines` over the whole file): what
    `qwen3kd prepare` writes, for tests and small tools; the trainer reads prepared data."""
    renderer = ChatRenderer(tokenizer, cfg.end_of_turn)
    stats = LoadStats()
    with open(path, encoding="utf-8") as f:
        lines = [(n, text) for n, text in enumerate(f, 1) if text.strip()]
    samples = [s for per_line in render_lines(lines, renderer, cfg, max_tokens, vocab_size, path, stats)
               for s in per_line]
    if not samples:
        raise DataError(f"{path}: no usable samples ({stats.describe()})")
    return samples, stats


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer: {e}") from None
