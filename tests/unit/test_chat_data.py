"""Chat data: rendering through the chat template, loss masks, packing, bad input."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qwen3kd.config.schema import BadLine, DataConfig, DataKind, Overlong
from qwen3kd.data.batches import collate, micro_batches
from qwen3kd.data.chat import load_chat, load_tokenizer
from qwen3kd.data.prepared import open_prepared, plan_of, prepare
from qwen3kd.errors import DataError

SEQ = 127  # rows of 128 tokens


@pytest.fixture(scope="module")
def tok(toy_assets):
    return load_tokenizer(toy_assets / "tokenizer")


def data_cfg(**kw) -> DataConfig:
    cfg = OmegaConf.structured(DataConfig)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def prepared(tmp_path, path, tok, seq=SEQ, seed=0, workers=1, **kw):
    """`path` prepared (qwen3kd prepare's code) and opened as the trainer opens it."""
    cfg = data_cfg(**kw)
    folder = tmp_path / f"{path.stem}-prepared"
    plan = plan_of(path, DataKind.chat, tok, cfg, seq, 384)
    prepare(path, folder, plan, tok.name_or_path, cfg, workers)
    return open_prepared(folder, tok, cfg, DataKind.chat, seq, 384, seed, build_index=True)


def write(tmp_path, *lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5.", "reasoning_content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 4 + 4? /no_think"},
    {"role": "assistant", "content": "8."},
]
# What each assistant turn is trained on, written out by hand (not rendered by the template):
# the prompt is the history (earlier thinking stripped) plus the generation prompt; the answer is
# what the model generates, up to and including <|im_end|>.
HISTORY = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
EXPECTED = {
    "think": [
        (HISTORY, "<think>\n2 plus 3 is 5.\n</think>\n\n5.<|im_end|>", 0),
        (HISTORY + "5.<|im_end|>\n<|im_start|>user\nAnd 4 + 4? /no_think<|im_end|>\n"
         "<|im_start|>assistant\n", "<think>\n\n</think>\n\n8.<|im_end|>", 1),  # soft switch
    ],
    "no_think": [
        (HISTORY + "<think>\n\n</think>\n\n", "5.<|im_end|>", 1),
        (HISTORY + "5.<|im_end|>\n<|im_start|>user\nAnd 4 + 4? /no_think<|im_end|>\n"
         "<|im_start|>assistant\n<think>\n\n</think>\n\n", "8.<|im_end|>", 1),
    ],
}


@pytest.mark.parametrize("mode", ["think", "no_think"])
def test_two_turn_conversation_masks_exactly_the_answers(tmp_path, tok, mode):
    msgs = [dict(m) for m in TWO_TURNS]
    if mode == "no_think":  # a no_think answer has no reasoning (an error otherwise, below)
        del msgs[1]["reasoning_content"]
    path = write(tmp_path, {"messages": msgs, "mode": mode})
    samples, _ = load_chat(path, tok, data_cfg(), SEQ + 1, 384)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(samples) == 2
    for s, (prompt, answer, mode_id) in zip(samples, EXPECTED[mode], strict=True):
        assert s.ids.tolist() == enc(prompt) + enc(answer)
        assert s.prompt_len == len(enc(prompt)) and s.mode == mode_id

    # Packed into one row, padded: position t is learned iff token t + 1 is an answer token.
    data = prepared(tmp_path, path, tok, shuffle=False)
    assert len(data) == 1
    mb = collate([data.row(0, SEQ)], SEQ)
    n1, n2 = len(samples[0].ids), len(samples[1].ids)
    p1, p2 = samples[0].prompt_len, samples[1].prompt_len
    expected = list(range(p1 - 1, n1 - 1)) + list(range(n1 + p2 - 1, n1 + n2 - 1))
    assert torch.nonzero(mb.loss_mask[0]).flatten().tolist() == expected
    # The first answer token is learned (at the last prompt position), the boundary is not.
    assert mb.labels[0, p1 - 1] == samples[0].ids[p1] and mb.loss_mask[0, n1 - 1] == 0
    learned = mb.labels[0][mb.loss_mask[0].bool()].tolist()
    assert tok.decode(learned) == EXPECTED[mode][0][1] + EXPECTED[mode][1][1]
    assert mb.modes[0, p1 - 1] == EXPECTED[mode][0][2] and mb.modes[0, n1 + p2 - 1] == EXPECTED[mode][1][2]
    # Positions restart with each sample; attention stays inside a sample and is causal.
    assert mb.position_ids[0, n1].item() == 0 and mb.position_ids[0, n1 - 1].item() == n1 - 1
    blocked = mb.attention_mask()[0, 0]
    assert blocked[n1, n1 - 1] and not blocked[n1 + 1, n1] and blocked[3, 4]
    assert (mb.segments[0, n1 + n2:] == -1).all() and mb.loss_mask[0, n1 + n2 - 1:].sum() == 0


def test_prompt_response_form_equals_the_messages_form(tmp_path, tok):
    a = write(tmp_path, {"prompt": "Hi", "response": "Hello.", "reasoning": "Greet.", "mode": "think"},
              name="a.jsonl")
    b = write(tmp_path, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant",
              "content": "Hello.", "reasoning_content": "Greet."}], "mode": "think"}, name="b.jsonl")
    (sa,), _ = load_chat(a, tok, data_cfg(), SEQ + 1, 384)
    (sb,), _ = load_chat(b, tok, data_cfg(), SEQ + 1, 384)
    assert sa.ids.tolist() == sb.ids.tolist() and sa.prompt_len == sb.prompt_len


GOOD = {"prompt": "Hi", "response": "Hello.", "mode": "no_think"}


@pytest.mark.parametrize("bad, why", [
    ("{not json", "Expecting property name"),
    ({"prompt": "Hi", "response": "x", "mode": "fast"}, "mode must be 'think' or 'no_think'"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "'role' must be one of"),
    ({"text": "Hi"}, "expected 'messages', or 'prompt' and 'response'"),
    ({"messages": TWO_TURNS, "mode": "no_think"}, "has reasoning_content but the sample's mode is no_think"),
])
def test_a_malformed_line_names_file_and_line_or_is_skipped_and_counted(tmp_path, tok, bad, why):
    path = write(tmp_path, GOOD, "", bad, GOOD)
    with pytest.raises(DataError, match=rf"{path}:3: bad sample: .*{why}"):
        load_chat(path, tok, data_cfg(), SEQ + 1, 384)
    samples, stats = load_chat(path, tok, data_cfg(bad_line=BadLine.skip), SEQ + 1, 384)
    assert len(samples) == 2 and stats.skipped_lines == 1 and stats.lines == 3


def test_over_length_samples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    long = {"prompt": "Hi", "response": "word " * 200, "mode": "no_think"}
    long_prompt = {"prompt": "word " * 200, "response": "ok", "mode": "no_think"}
    path = write(tmp_path, GOOD, long, long_prompt)
    samples, stats = load_chat(path, tok, data_cfg(), SEQ + 1, 384)
    assert (stats.truncated, stats.dropped, len(samples)) == (1, 1, 2)
    assert len(samples[1].ids) == SEQ + 1 and samples[1].prompt_len < SEQ
    samples, stats = load_chat(path, tok, data_cfg(overlong=Overlong.drop), SEQ + 1, 384)
    assert (stats.truncated, stats.dropped, len(samples)) == (0, 2, 1)


def test_token_ids_beyond_the_model_vocabulary_are_an_error(tmp_path, tok):
    path = write(tmp_path, GOOD)
    with pytest.raises(DataError, match=rf"{path}:1: .*>= model.vocab_size=200"):
        load_chat(path, tok, data_cfg(), SEQ + 1, 200)


def test_packing_fills_rows_and_keeps_every_sample_once(tmp_path, tok):
    rng = np.random.default_rng(0)
    lines = [{"prompt": "Q" * int(rng.integers(1, 40)), "response": "A" * int(rng.integers(1, 40)),
              "mode": "think" if i % 2 else "no_think"} for i in range(60)]
    path = write(tmp_path, *lines)
    samples, _ = load_chat(path, tok, data_cfg(), SEQ + 1, 384)
    packed = prepared(tmp_path, path, tok, seed=3)
    rows = [packed.members[a:b].tolist() for a, b in zip(packed.ptr[:-1], packed.ptr[1:], strict=True)]
    (tmp_path / "unpacked").mkdir()
    unpacked = prepared(tmp_path / "unpacked", path, tok, seed=3, pack=False)
    assert sorted(i for r in rows for i in r) == list(range(len(samples)))
    lower_bound = -(-sum(len(s.ids) for s in samples) // (SEQ + 1))
    assert len(unpacked) == len(samples) and len(packed) <= 1.2 * lower_bound, (len(packed), lower_bound)
    assert all(sum(len(samples[i].ids) for i in r) <= SEQ + 1 for r in rows)
    total = sum(packed.row(i, SEQ).mask.sum() for i in range(len(packed)))
    assert total == sum(len(s.ids) - s.prompt_len for s in samples)


def reference_row(samples) -> dict:
    """A packed row as the in-memory loader built it before prepared data (the oracle)."""
    ids = np.concatenate([s.ids for s in samples]).astype(np.int64)
    segments = np.concatenate([np.full(len(s.ids), k) for k, s in enumerate(samples)])
    mask, modes, start = np.zeros(len(ids), np.float32), np.zeros(len(ids), np.int64), 0
    for s in samples:
        mask[start + s.prompt_len - 1: start + len(s.ids) - 1] = 1.0
        modes[start: start + len(s.ids)] = s.mode
        start += len(s.ids)
    from qwen3kd.data.batches import Row

    return Row(ids=ids, mask=mask[:-1], segments=segments, modes=modes[:-1])


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_micro_batches_equal_the_in_memory_ones(tmp_path, tok, toy_assets, workers, monkeypatch):
    """Every micro-batch of a prepared dataset (token ids, labels, loss masks, positions, sample
    boundaries, modes) equals the one built in memory from the rendered JSONL with the
    per-sample packer; with 2 worker processes and several shards and chunks too."""
    from test_packing import reference_index

    import qwen3kd.data.prepared as prep

    monkeypatch.setattr(prep, "CHUNK_LINES", 50)
    from qwen3kd.toy import write_chat

    path = write_chat(tmp_path / "train.jsonl", 700, seed=5)
    path.write_text(path.read_text() + "\n" + json.dumps({"messages": TWO_TURNS}) + "\n")  # multi-turn
    data = prepared(tmp_path, path, tok, seed=11, workers=workers, prepare_shard_lines=200)
    assert len(data.shards) == 4 and data.manifest["counts"]["lines"] == 701
    samples, _ = load_chat(path, tok, data_cfg(), SEQ + 1, 384)
    rows = reference_index(np.array([len(s.ids) for s in samples]), SEQ + 1, True, True, 11, 8192)
    assert len(data) == len(rows)
    # Sample order and identity: the prepared samples are the rendered ones, in file order.
    assert [(s.line, s.turn) for r in range(len(data)) for s in data.row_samples(r)] == \
        [(samples[i].line, samples[i].turn) for r in rows for i in r]
    ref = [reference_row([samples[i] for i in r]) for r in rows]
    for step in range(len(rows) // 8):
        got = micro_batches(data, step * 8, 8, 4, 0, 1, SEQ)
        want = [collate(ref[step * 8 + m * 4: step * 8 + m * 4 + 4], SEQ) for m in range(2)]
        for g, w in zip(got, want, strict=True):
            for f in ("tokens", "labels", "loss_mask", "position_ids", "segments", "modes"):
                assert torch.equal(getattr(g, f), getattr(w, f)), (step, f)


def test_a_bad_line_in_a_worker_process_names_file_and_line(tmp_path, tok, monkeypatch):
    import qwen3kd.data.prepared as prep
    from qwen3kd.toy import write_chat

    monkeypatch.setattr(prep, "CHUNK_LINES", 50)
    path = write_chat(tmp_path / "train.jsonl", 300, seed=2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:170] + ['{"prompt": "Hi"}'] + lines[170:]) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:171: bad sample: expected 'messages', or 'prompt' and"):
        prepared(tmp_path, path, tok, workers=2)
    assert not (tmp_path / "train-prepared" / "manifest.json").exists()


WRONG = "tens: 4 + 8 + 1 = 14, carry 1\n"  # a wrong column line, then the line that checks it
CORRECTED = {"role": "assistant", "content": "347 + 285 = 632", "no_loss": [WRONG],
             "reasoning_content": "ones: 7 + 5 = 12, carry 1\n" + WRONG
             + "check: tens 4 + 8 + 1 = 13, carry 1\nhundreds: 3 + 2 + 1 = 6"}


def test_a_no_loss_span_is_in_the_input_and_carries_no_loss(tmp_path, tok):
    """A hand-written answer with a wrong line that must be seen (the check after it refers to
    it) but never learned: its tokens are inputs, their labels are masked; every other answer
    token is learned, the prompt is not."""
    path = write(tmp_path, {"messages": [{"role": "user", "content": "What is 347 + 285?"}, CORRECTED],
                            "mode": "think"})
    (s,), _ = load_chat(path, tok, data_cfg(), 256, 384)
    answer = s.ids[s.prompt_len:].tolist()
    assert tok.decode([t for t, keep in zip(answer, s.learned, strict=True) if not keep]) == WRONG
    assert tok.decode([t for t, keep in zip(answer, s.learned, strict=True) if keep]) == (
        "<think>\nones: 7 + 5 = 12, carry 1\ncheck: tens 4 + 8 + 1 = 13, carry 1\n"
        "hundreds: 3 + 2 + 1 = 6\n</think>\n\n347 + 285 = 632<|im_end|>")
    # Prepared, the flags carry it into the row's loss mask: label t is learned iff token t + 1 is.
    row = prepared(tmp_path, path, tok, seq=255, shuffle=False).row(0, 255)
    assert row.ids.tolist() == s.ids.tolist()
    learned = np.r_[np.zeros(s.prompt_len, bool), s.learned]
    assert row.mask.tolist() == learned[1:].astype(np.float32).tolist()
    assert tok.decode(row.ids[1:][row.mask == 0][s.prompt_len - 1:].tolist()) == WRONG


@pytest.mark.parametrize("span, why", [("carry 9", "no_loss span 'carry 9' is not in its rendered text"),
                                       (3, "'no_loss' must be a list of non-empty strings")])
def test_a_bad_no_loss_span_names_the_line(tmp_path, tok, span, why):
    path = write(tmp_path, GOOD, {"messages": [{"role": "user", "content": "What is 347 + 285?"},
                                               {**CORRECTED, "no_loss": [span]}], "mode": "think"})
    with pytest.raises(DataError, match=rf"{path}:2: bad sample: .*{why}"):
        load_chat(path, tok, data_cfg(), SEQ + 1, 384)
