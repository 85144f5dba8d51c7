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
    train: object  # rows: data/lm.SyntheticTokens or data/prepared.PreparedDataset
    eval: object | None
    tokenizer: object | None  # the student's (chat data)
    tokenizer_dir: Path | None

    @classmethod
    def open(cls, cfg: JobConfig) -> TrainData:
        d, t = cfg.data, cfg.train
        reads_data = cfg.teacher is None or Phase.offpolicy in cfg.phases  # else rollouts are the data
        train = held_out = None
        tok, tok_dir = open_tokenizer(cfg)
        if d.kind in (DataKind.chat, DataKind.tokens):
            if reads_data:
                train = open_file_data(cfg, Path(d.path), tok, tok_dir)
            if d.eval_path:
                held_out = open_file_data(cfg, Path(d.eval_path), tok, tok_dir)
        elif reads_data:
            from qwen3kd.data.lm import SyntheticTokens

            train = SyntheticTokens(t.seed, cfg.model.vocab_size)
        return cls(train, held_out, tok, tok_dir)


def open_tokenizer(cfg: JobConfig):
    """The student's tokenizer and its folder (chat data and on-policy runs need one; else
    (None, None)), conformance with the teacher's checked."""
    d = cfg.data
    if d.kind is not DataKind.chat and not (cfg.teacher is not None and Phase.onpolicy in cfg.phases):
        return None, None
    from qwen3kd.data.chat import load_tokenizer

    tok_dir = tokenizer_path(d.tokenizer, cfg.checkpoint.load, "data.tokenizer", "checkpoint.load")
    tok = load_tokenizer(tok_dir)
    if cfg.teacher is not None:
        check_teacher(cfg, tok, tok_dir)
    return tok, tok_dir


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


def open_file_data(cfg: JobConfig, path: Path, tok, tok_dir: Path | None):
    """A prepared folder, or a JSONL file prepared on first use into data.cache: by rank 0, while
    the other ranks wait for its manifest (or its error, which they raise too: no collective is
    involved, so a bad line cannot hang them)."""
    import os

    import torch.distributed as dist

    from qwen3kd.data import prepared
    from qwen3kd.errors import DataError
    from qwen3kd.files import write_text_atomic

    d, t = cfg.data, cfg.train
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    folder = path
    if path.is_file():
        plan = prepared.plan_of(path, d.kind, tok, d, t.seq_length, cfg.model.vocab_size)
        folder = prepared.cache_folder(path, plan, d.cache)
        failed = prepared.error_file(folder)
        if rank0:
            failed.unlink(missing_ok=True)
            try:
                with prepared.locked(folder):
                    prepared.prepare(path, folder, plan, tok_dir, d, d.prepare_workers or os.cpu_count() or 1)
            except DataError as e:
                folder.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(failed, f"{e}\n")
                raise
        else:
            prepared.wait_for(folder / "manifest.json", f"rank 0 to prepare {path} into {folder}", failed)
    return prepared.open_prepared(folder, tok, d, d.kind, t.seq_length, cfg.model.vocab_size, t.seed,
                                  build_index=rank0)
