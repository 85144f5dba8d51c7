"""Prepared datasets (qwen3kd/data/prepared.py): `qwen3kd prepare` killed mid-way and rerun writes
each conversation once; a prepared folder that does not fit the run is one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import SMOKE, qwen3kd
from omegaconf import OmegaConf

from qwen3kd.config.schema import DataConfig, DataKind
from qwen3kd.data.chat import load_tokenizer
from qwen3kd.data.prepared import open_prepared
from qwen3kd.errors import DataError
from qwen3kd.toy import write_chat

CONFIG = str(SMOKE / "offpolicy-tiny.yaml")
SEQ = 128  # the smoke config's


def prepare_args(a: Path, data: Path, cache: Path) -> list[str]:
    return ["prepare", CONFIG, f"data.path={data}", "data.eval_path=null", f"data.tokenizer={a / 'tokenizer'}",
            f"teacher.load={a / 'teacher'}", f"data.cache={cache}", "data.prepare_shard_lines=500",
            "--workers", "2"]


def folder_of(stdout: str) -> Path:
    line = next(x for x in stdout.splitlines() if x.startswith("data.path:"))
    return Path(line.split(" → ")[1].split(" (")[0])


@pytest.fixture(scope="module")
def clean(toy_assets, tmp_path_factory) -> Path:
    """2,000 conversations in 4 shards, prepared in one go."""
    tmp = tmp_path_factory.mktemp("prepared")
    data = write_chat(tmp / "conv.jsonl", 2000, seed=1)
    return folder_of(qwen3kd(*prepare_args(toy_assets, data, tmp / "cache")).stdout)


def test_a_killed_prepare_resumes_and_writes_each_conversation_once(toy_assets, clean, tmp_path):
    data = tmp_path / "conv.jsonl"
    shutil.copy(clean.parent.parent / "conv.jsonl", data)
    args = prepare_args(toy_assets, data, tmp_path / "cache")
    # Killed after chunk 2: shards 0 and 1 complete, shard 2's files half written.
    p = qwen3kd(*args, check=False, env={"QWEN3KD_FAULT": "prepare_chunk@2"})
    assert p.returncode == -9, p.stderr[-2000:]
    folder = next((tmp_path / "cache").glob("conv-*/"))
    assert sorted(f.name for f in folder.glob("*.done")) == ["shard-00000.done", "shard-00001.done"]
    assert list(folder.glob("shard-00002*.tmp")) and not (folder / "manifest.json").exists()
    p = qwen3kd(*args)
    assert "resuming: 2 of 4 shards are complete" in p.stderr and folder_of(p.stdout) == folder
    # The same bytes as the uninterrupted prepare, and every source line exactly once.
    for f in sorted(clean.glob("shard-*")):
        if f.suffix != ".done":
            assert (folder / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(folder.glob("*.tmp"))
    lines = np.concatenate([np.load(f)[:, 0] for f in sorted(folder.glob("shard-*.meta.npy"))])
    assert sorted(lines.tolist()) == list(range(1, 2001))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["lines"] == manifest["counts"]["samples"] == 2000
    assert manifest["counts"] == json.loads((clean / "manifest.json").read_text())["counts"]


def data_cfg(**kw) -> DataConfig:
    cfg = OmegaConf.structured(DataConfig)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def open_copy(clean: Path, tmp_path: Path, tok, seq: int = SEQ, **cfg):
    copy = tmp_path / "copy"
    if not copy.exists():
        shutil.copytree(clean, copy, ignore=shutil.ignore_patterns("pack-*"))
    return open_prepared(copy, tok, data_cfg(**cfg), DataKind.chat, seq, 384, 0, build_index=True), copy


def test_a_folder_that_does_not_fit_the_run_is_one_clear_error(toy_assets, clean, tmp_path):
    tok = load_tokenizer(toy_assets / "tokenizer")
    data, copy = open_copy(clean, tmp_path, tok)  # fits: opens
    assert len(data) > 0 and data.row(0, SEQ).ids.dtype == np.int64
    cases = []
    # Another seq_length: its samples were cut to the old one.
    cases.append((dict(seq=256), rf"{copy}/manifest.json: prepared for seq_length 128"))
    # Another tokenizer: a different chat template, then a different token map.
    other = tmp_path / "tok2"
    tok.save_pretrained(other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    if "chat_template" in cfg:
        cfg["chat_template"] = cfg["chat_template"].replace("<|im_start|>", "<|im_start|> ", 1)
        (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        t = (other / "chat_template.jinja").read_text()
        (other / "chat_template.jinja").write_text(t.replace("<|im_start|>", "<|im_start|> ", 1))
    cases.append((dict(tok=load_tokenizer(other)), rf"{copy}/manifest.json: .*its chat template differs"))
    added = load_tokenizer(toy_assets / "tokenizer")
    added.add_tokens(["<extra>"])
    cases.append((dict(tok=added), rf"{copy}/manifest.json: .*its token → id map differs"))
    # Content settings: dropped instead of truncated over-length samples.
    cases.append((dict(overlong="drop"), r"prepared with data.overlong=truncate, the config says drop"))
    for kw, message in cases:
        with pytest.raises(DataError, match=message):
            open_prepared(copy, kw.pop("tok", tok), data_cfg(**{k: v for k, v in kw.items() if k != "seq"}),
                          DataKind.chat, kw.get("seq", SEQ), 384, 0, build_index=True)
    # A truncated .bin; then an .idx that belongs to another shard.
    bin_ = copy / "shard-00001.bin"
    bin_.write_bytes(bin_.read_bytes()[:-12])
    with pytest.raises(DataError, match=rf"{bin_}: .* bytes, but its index shard-00001.idx describes"):
        open_prepared(copy, tok, data_cfg(), DataKind.chat, SEQ, 384, 0, build_index=True)
    shutil.copy(clean / "shard-00001.bin", bin_)
    shutil.copy(clean / "shard-00002.idx", copy / "shard-00001.idx")
    with pytest.raises(DataError, match=rf"{bin_}: .*the .bin is truncated or the .idx belongs to other"):
        open_prepared(copy, tok, data_cfg(), DataKind.chat, SEQ, 384, 0, build_index=True)
    # No manifest: not a prepared folder (a prepare that did not finish).
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match=rf"{copy}: not a prepared dataset \(no manifest.json"):
        open_prepared(copy, tok, data_cfg(), DataKind.chat, SEQ, 384, 0, build_index=True)


def test_train_names_the_file_in_one_line(toy_assets, clean, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    (copy / "shard-00003.flags.bin").write_bytes(b"")
    a = toy_assets
    p = qwen3kd("train", CONFIG, "parallel.tensor=1", f"data.path={copy}", "data.eval_path=null",
                f"data.tokenizer={a / 'tokenizer'}", f"teacher.load={a / 'teacher'}", "eval.interval=0",
                f"run.dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert sum("error" in x.lower() for x in p.stderr.splitlines()) == 1, p.stderr[-3000:]
    assert line.startswith(f"qwen3kd: error: {copy}/shard-00003.flags.bin: 0 bytes, but its index "
                           f"shard-00003.flags.idx describes 500 sequences in "), line
