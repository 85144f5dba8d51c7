"""The toy tokenizer behaves like a Qwen3 tokenizer folder where this project relies on it."""

import hashlib
from pathlib import Path

import pytest
import transformers

from qwen3kd.data.toy_tokenizer import QWEN3_CHAT_TEMPLATE, build_toy_tokenizer

CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_toy_tokenizer(tmp_path_factory.mktemp("toy_tok"))


@pytest.fixture(scope="module")
def tok(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_generation_prompt_with_thinking_off_and_on(tok):
    hi = [{"role": "user", "content": "hi"}]
    off = _render(tok, hi, add_generation_prompt=True, enable_thinking=False)
    assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    on = _render(tok, hi, add_generation_prompt=True, enable_thinking=True)
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # Thinking is on unless switched off, as in Qwen3.
    assert _render(tok, hi, add_generation_prompt=True) == on


@pytest.mark.parametrize("inline", [False, True], ids=["reasoning_content", "think_in_content"])
def test_thinking_is_kept_only_after_the_last_user_turn(tok, inline):
    def answer(thought, text):
        if inline:
            return {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{text}"}
        return {"role": "assistant", "content": text, "reasoning_content": thought}

    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        answer("2 plus 3 makes 5.", "5"),
        {"role": "user", "content": "And 4 + 4?"},
        answer("4 plus 4 makes 8.", "8"),
    ]
    assert _render(tok, messages) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"  # history: the thinking is dropped
        "<|im_start|>user\nAnd 4 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n4 plus 4 makes 8.\n</think>\n\n8<|im_end|>\n"
    )


def test_system_prompt_and_tools_render(tok):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    text = _render(tok, [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "hi"}], tools=tools)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '"name": "add"' in text and text.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_control_tokens_are_single_ids_after_the_vocabulary(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in CONTROL]
    assert ids == list(range(len(tok) - len(CONTROL), len(tok)))
    for t, i in zip(CONTROL, ids, strict=True):
        assert tok.encode(t, add_special_tokens=False) == [i], t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    # As in Qwen3: the first three are special, the think markers are plain added tokens.
    assert set(CONTROL[:3]) <= set(tok.all_special_tokens)
    assert not set(CONTROL[3:]) & set(tok.all_special_tokens)
    text = "<|im_start|>assistant\n<think>\nok\n</think>\n\nyes<|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == (
        "assistant\n<think>\nok\n</think>\n\nyes")


@pytest.mark.parametrize("text", [
    "hello world",
    "What is 123 + 4567?\n123 + 4567 = 4690.\n\n",
    "  leading and trailing spaces  \n\tand a tab\r\n",
    "".join(chr(c) for c in range(32, 127)),  # every printable ASCII character
    "line1\nline2\n\n\nline5 0123456789",
    "not ASCII: café, naïve, 数字, ✓",  # byte-level: whatever the corpus never saw
])
def test_encode_decode_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < len(tok)


def test_digits_are_split_one_by_one(tok):
    # Qwen's pre-tokenizer makes every digit its own piece: no merges across digits.
    assert len(tok.encode("31415926", add_special_tokens=False)) == 8


def test_rendered_chat_round_trips_with_one_id_per_control_token(tok):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]
    text = _render(tok, messages)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2
    assert ids.count(tok.convert_tokens_to_ids("<think>")) == 1


def test_template_on_disk_is_the_qwen3_template(folder, tok):
    # Pinned so that an accidental edit of the constant (an editor trimming whitespace, say)
    # fails here: the template was copied verbatim and must stay so.
    assert hashlib.sha256(QWEN3_CHAT_TEMPLATE.encode()).hexdigest() == (
        "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8")
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == QWEN3_CHAT_TEMPLATE
    assert tok.chat_template == QWEN3_CHAT_TEMPLATE


def test_build_is_deterministic(folder, tmp_path):
    again = build_toy_tokenizer(tmp_path / "again")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.parametrize("vocab_size", [270, 300, 320, 384])
def test_ids_never_exceed_vocab_size(tmp_path, vocab_size):
    tok = transformers.AutoTokenizer.from_pretrained(
        str(build_toy_tokenizer(tmp_path, vocab_size=vocab_size)))
    assert len(tok) <= vocab_size
    assert tok.convert_tokens_to_ids("</think>") == len(tok) - 1


def test_the_default_build_fills_its_vocab_size(tok):
    assert len(tok) == 320


def test_custom_corpus(tmp_path):
    out = build_toy_tokenizer(tmp_path, corpus=["abc abc abc", "abd abd"], vocab_size=300)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) <= 300
    assert tok.decode(tok.encode("abc xyz 42", add_special_tokens=False)) == "abc xyz 42"


def test_too_small_vocab_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_toy_tokenizer(tmp_path, vocab_size=100)
