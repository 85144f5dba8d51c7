"""A toy byte-level BPE tokenizer shaped like Qwen3's: a stand-in for a real Qwen3 tokenizer folder.

Tests and the toy demo need a Hugging Face tokenizer folder that behaves like Qwen3's where it
matters to this project (the chat template with thinking on and off, `<|im_end|>` as the end of
a turn, `<think>`/`</think>` as single tokens, byte-level BPE that round-trips any text) without
downloading the real one. Real runs load the real folder (`data.tokenizer` / the teacher's
files); nothing here is used by them.

`build_toy_tokenizer` trains a few hundred merges on a small corpus and writes the folder with
`PreTrainedTokenizerFast.save_pretrained`, so `AutoTokenizer.from_pretrained` loads it as it
loads Qwen3's. Same inputs give byte-identical files.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# Qwen3's control tokens. As in the real tokenizer, the first three are special (dropped by
# `decode(..., skip_special_tokens=True)`) and the think markers are ordinary added tokens
# (special=False), so decoding keeps them; all five come after the BPE vocabulary, in this order.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ADDED_TOKENS = (THINK_START, THINK_END)

# Qwen2/Qwen3's pre-tokenizer split (from their tokenizer.json): like GPT-4's, but every digit
# is its own piece, which keeps arithmetic tokenized digit by digit as in the real models.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# model_max_length of Qwen3-8B's tokenizer_config.json (only metadata here).
MODEL_MAX_LENGTH = 131072

# The chat template of the hybrid-thinking Qwen3 models, verbatim: the `chat_template` field of
# Qwen/Qwen3-8B's tokenizer_config.json (the template with `enable_thinking`). It is a raw string:
# real newlines where the template has them, a backslash and `n` where its Jinja source escapes one.
# Taken from guidance-ai/guidance, guidance/chat.py, a mid-2025 version (`qwen3_it_template`, noted
# "From https://huggingface.co/Qwen/Qwen3-8B/blob/main/tokenizer_config.json#L230"). Checked: apart
# from the generation prompt (which there always opens `<think>\n`), it is character for character
# the chat_template of the Qwen3-4B-Thinking-2507 tokenizer_config.json kept in akougkas/warpio-cli,
# warpio-docs/ai-docs/model_cards/qwen3:4b.md. An earlier Qwen3 revision (without the
# `message.content is string` guards) circulates too, e.g. in huggingface.js's jinja tests: not it.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


# What the default corpus is made of: plain English, sums, and the words the chat template
# writes around every turn, so that the toy's merges cover what the tests and the demo render.
_SUBJECTS = ("the cat", "a dog", "the teacher", "my friend", "the student", "a small model")
_VERBS = ("reads", "writes", "counts", "thinks about", "explains", "checks")
_OBJECTS = ("the answer", "a short story", "the numbers", "each step", "the question", "a sum")
_CHAT_LINES = (
    "user", "assistant", "system", "tool",
    "You are a helpful assistant.",
    "Let me think step by step.",
    "First, add the ones. Then, add the tens.",
    "So the answer is",
    "Hello! How can I help you today?",
    "Please solve the following problem and explain your reasoning.",
)


def default_corpus() -> list[str]:
    """A few hundred short English and arithmetic lines, generated (no data file to ship)."""
    # Paragraph breaks: as in Qwen3's vocabulary, "\n\n" becomes one token (the empty think block
    # and the end of a no_think generation prompt are made of it).
    lines = [f"{s.capitalize()} {v} {o}\n\n" for s, v, o in
             itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
    for a, b in itertools.product(range(0, 100, 7), (3, 8, 12, 45, 99)):
        lines.append(f"What is {a} + {b}?\n{a} + {b} = {a + b}.")
        lines.append(f"{a * b} - {b} = {a * b - b}")
    lines.extend(_CHAT_LINES)
    return lines


def build_toy_tokenizer(out_dir: Path, corpus: Iterable[str] | None = None,
                        vocab_size: int = 320) -> Path:
    """Train a byte-level BPE tokenizer with Qwen3's control tokens and chat template, save it.

    `vocab_size` bounds the total number of ids, added tokens included: the BPE model gets
    `vocab_size - 5` ids (256 bytes + merges), then <|endoftext|>, <|im_start|>, <|im_end|>,
    <think>, </think> take the next five. A small corpus may stop short of the bound; never past
    it. Keep it at most the model's embedding width (Qwen3: 151,669 ids in 151,936 rows).

    Returns `out_dir`, which holds tokenizer.json, tokenizer_config.json and chat_template.jinja.
    """
    # Imported here: transformers is a dev/tools dependency, not one of the trainer's.
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    n_added = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + n_added:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                         f"{n_bytes} byte tokens + {n_added} added tokens")
    lines = default_corpus() if corpus is None else list(corpus)

    # The same pipeline as Qwen3's tokenizer.json: NFC, the regex split, then bytes mapped to
    # printable characters (no prefix space), so any text encodes and decodes back exactly.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # All 256 bytes are in the alphabet whatever the corpus holds (else a byte the corpus lacks
    # would not encode). The control tokens are not given to the trainer, which would put them at
    # ids 0..4; added afterwards they follow the vocabulary, as in Qwen3. Ties between equally
    # frequent pairs are broken by pair ids, not hash order, so training is deterministic.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,  # the end of a turn, as in Qwen3's instruct/hybrid models
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],  # Qwen3's additional_special_tokens, v5 name
        chat_template=QWEN3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    if len(hf) > vocab_size:  # cannot happen unless tokenizers changes how it counts
        raise AssertionError(f"toy tokenizer has {len(hf)} ids > vocab_size={vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    log.info("toy tokenizer: %d ids (%d BPE from %d lines + %d added) -> %s",
             len(hf), n_bpe, len(lines), n_added, out_dir)
    return out_dir
