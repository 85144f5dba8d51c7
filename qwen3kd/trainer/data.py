"""The run's data: tokenizer(s), the teacher/student conformance check, training and held-out rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qwen3kd.checkpoint.weights import hf_files_of
from qwen3kd.config.schema import DataKind, JobConfig, Phase
from qwen3kd.errors import ConfigError

log = logging.getLogger(__name__)


def tokenizer_path(explicit: str | None, load: str | None, key: str, load_key: str) -> Path:
    if explicit:
        return Path(explicit)
    found = hf_files_of(Path(load)) if load else None
    if found is None:
        raise ConfigError(f"{key} is not set and {load_key}={load} has no tokenizer files next "
                          f"to it: set {key} to a tokenizer folder")
    return found


@dataclass
class TrainData:
    train: object  # rows: data/lm.py datasets or data/batches.PackedSamples
    eval: object | None
    tokenizer: object | None  # the student's (chat data)
    tokenizer_dir: Path | None

    @classmethod
    def open(cls, cfg: JobConfig) -> TrainData:
        d, t = cfg.data, cfg.train
        onpolicy = cfg.teacher is not None and Phase.onpolicy in cfg.phases
        reads_data = cfg.teacher is None or Phase.offpolicy in cfg.phases  # else rollouts are the data
        tok = tok_dir = train = held_out = None
        if d.kind is DataKind.chat or onpolicy:
            from qwen3kd.data.chat import load_tokenizer

            tok_dir = tokenizer_path(d.tokenizer, cfg.checkpoint.load, "data.tokenizer", "checkpoint.load")
            tok = load_tokenizer(tok_dir)
            if cfg.teacher is not None:
                check_teacher(cfg, tok, tok_dir)
        if d.kind is DataKind.chat:
            from qwen3kd.data.chat import open_chat

            if reads_data:
                train = open_chat(d.path, tok, d, t.seq_length, cfg.model.vocab_size, t.seed)
            if d.eval_path:
                held_out = open_chat(d.eval_path, tok, d, t.seq_length, cfg.model.vocab_size, t.seed)
        elif reads_data:
            from qwen3kd.data.lm import open_dataset

            train = open_dataset(d, t.seed, cfg.model.vocab_size)
        return cls(train, held_out, tok, tok_dir)


def check_teacher(cfg: JobConfig, student_tok, student_dir: Path) -> None:
    from qwen3kd.data.chat import load_tokenizer
    from qwen3kd.data.conformance import check_conformance, conformance_problems

    te = cfg.teacher
    teacher_dir = tokenizer_path(te.tokenizer, te.load, "teacher.tokenizer", "teacher.load")
    teacher_tok = load_tokenizer(teacher_dir)
    where = f"student {student_dir}, teacher {teacher_dir}"
    if te.skip_conformance:
        for p in conformance_problems(student_tok, teacher_tok, cfg.model.vocab_size,
                                      te.model.vocab_size):
            log.warning("teacher.skip_conformance=true: training despite: %s", p)
        return
    check_conformance(student_tok, teacher_tok, cfg.model.vocab_size, te.model.vocab_size, where)
