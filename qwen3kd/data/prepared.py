"""Prepared datasets: JSONL tokenized once into megatron-core indexed datasets, memory-mapped.

`qwen3kd prepare` (or the trainer, the first time it meets a JSONL `data.path`) renders every
conversation with the tokenizer's chat template in worker processes and writes, per shard of
`data.prepare_shard_lines` source lines, into one folder:

  shard-NNNNN.bin/.idx         token ids, int32 (Qwen3's vocabulary does not fit 16 bits), one
                               sequence per sample (an assistant turn), one document per line
  shard-NNNNN.flags.bin/.idx   uint8 per token, aligned with the ids: bit 0 set where the token is
                               learned (a label the loss covers), bits 1–7 the sample's mode id.
                               The loss mask is fixed here, never re-derived.
  shard-NNNNN.meta.npy         int32 [samples, 4]: source line, assistant turn, prompt length, mode
  shard-NNNNN.done             the shard's counts; written after its files, so a shard without
                               it (a killed prepare) is written again, and each line lands once
  plan.json                    what decides the content: format, source hash and line count,
                               tokenizer token-map and chat-template hashes, seq_length, data.*
  manifest.json                written last: the plan, the shards and the counts (lines, samples,
                               malformed, truncated, dropped, tokens, largest id)
  pack-KEY.{ptr,members}.npy   packing indexes (data/packing.py), one per packing setting

A JSONL `data.path` is prepared into `data.cache` (default: a `.prepared` folder beside it), in
a folder named by a hash of its plan: the same file with the same tokenizer and settings is
prepared once, for every run and stage that reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen3kd.config.schema import DataConfig, DataKind
from qwen3kd.data.batches import Row
from qwen3kd.data.chat import ChatSample, LoadStats
from qwen3kd.errors import DataError
from qwen3kd.faults import maybe_kill
from qwen3kd.files import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "qwen3kd-prepared/1"
CHUNK_LINES = 2_000  # lines per work item of a worker
WAIT_S = 4 * 3600  # how long other ranks wait for rank 0's prepare or packing index
LEARNED = 1  # flags bit 0; the mode id sits above it
PROGRESS_S = 5.0

# megatron-core logs three lines per index it opens: noise at one index per shard.
logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)


def sha256_file(path: Path) -> tuple[str, int]:
    """The file's sha256 and its number of lines."""
    h, lines, last = hashlib.sha256(), 0, b""
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return h.hexdigest(), lines + (last not in (b"", b"\n"))


def tokenizer_hashes(tok) -> dict[str, str | None]:
    """What makes two tokenizers interchangeable for prepared data: the token → id map and the
    chat template (None without a tokenizer: data.kind=tokens may have none)."""
    if tok is None:
        return {"token_map_sha256": None, "chat_template_sha256": None}
    # The hashes of the run's lineage tags.
    from qwen3kd.tracking.lineage import text_hash, vocab_hash

    return {"token_map_sha256": vocab_hash(tok.get_vocab()),
            "chat_template_sha256": text_hash(tok.chat_template or "")}


def plan_of(src: Path, kind: DataKind, tok, d: DataConfig, seq_length: int, vocab_size: int) -> dict:
    digest, lines = sha256_file(src)
    return {"format": FORMAT, "kind": kind.value,
            "source": {"name": src.name, "sha256": digest, "lines": lines},
            "tokenizer": tokenizer_hashes(tok), "seq_length": seq_length, "vocab_size": vocab_size,
            "data": _content_settings(d, kind), "shard_lines": d.prepare_shard_lines}


def _content_settings(d: DataConfig, kind: DataKind) -> dict:
    """The data.* keys that change what is written."""
    if kind is DataKind.tokens:
        return {"overlong": d.overlong.value}
    return {"default_mode": d.default_mode.value, "overlong": d.overlong.value,
            "bad_line": d.bad_line.value, "end_of_turn": d.end_of_turn}


def cache_folder(src: Path, plan: dict, cache: str | None) -> Path:
    root = Path(cache) if cache else src.parent / ".prepared"
    key = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return root / f"{src.stem}-{key[:12]}"


# ---- writing ------------------------------------------------------------------------------
class _Renderer:
    """A worker's state: renders chunks of numbered lines into arrays."""

    def __init__(self, tok_dir: str, kind: str, d: DataConfig, max_tokens: int, vocab_size: int,
                 src: str):
        from qwen3kd.data.chat import ChatRenderer, load_tokenizer

        self.kind, self.d, self.max_tokens, self.vocab, self.src = DataKind(kind), d, max_tokens, vocab_size, src
        self.renderer = None
        if self.kind is DataKind.chat:
            self.renderer = ChatRenderer(load_tokenizer(tok_dir), d.end_of_turn)  # type: ignore[arg-type]

    def __call__(self, lines: list[tuple[int, str]]) -> dict:
        stats = LoadStats()
        if self.kind is DataKind.chat:
            from qwen3kd.data.chat import render_lines

            per_line = render_lines(lines, self.renderer, self.d, self.max_tokens, self.vocab, self.src, stats)
        else:
            per_line = [self._tokens_line(n, text, stats) for n, text in lines]
        samples = [s for line in per_line for s in line]
        lengths = np.array([len(s.ids) for s in samples], dtype=np.int64)
        flags = []
        for s in samples:
            f = np.full(len(s.ids), s.mode << 1, dtype=np.uint8)
            f[s.prompt_len:] |= LEARNED if s.learned is None else s.learned.astype(np.uint8)
            flags.append(f)
        return {
            "ids": np.concatenate([s.ids for s in samples]).astype(np.int32) if samples else np.zeros(0, np.int32),
            "flags": np.concatenate(flags) if flags else np.zeros(0, np.uint8),
            "lengths": lengths, "per_line": np.array([len(x) for x in per_line if x], dtype=np.int64),
            "meta": np.array([(s.line, s.turn, s.prompt_len, s.mode) for s in samples],
                             dtype=np.int32).reshape(-1, 4),
            "stats": stats.__dict__,
        }

    def _tokens_line(self, n: int, text: str, stats: LoadStats) -> list[ChatSample]:
        """kind=tokens: {"input_ids": [...]}, every token after the first learned."""
        stats.lines += 1
        try:
            arr = np.asarray(json.loads(text)["input_ids"], dtype=np.int64)
            if arr.ndim != 1 or len(arr) < 2:
                raise ValueError("input_ids must be a list of at least 2 token ids")
            if arr.min() < 0 or arr.max() >= self.vocab:
                raise ValueError(f"token id out of range [0, {self.vocab})")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{self.src}:{n}: bad sample: {e}") from None
        if len(arr) > self.max_tokens:
            arr, stats.truncated = arr[: self.max_tokens], stats.truncated + 1
        stats.samples += 1
        return [ChatSample(arr.astype(np.int32), 1, 0, n, 0)]


_WORKER: _Renderer | None = None


def _init_worker(*args) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = _Renderer(*args)


def _render_in_worker(task):
    shard, lines = task
    return shard, _WORKER(lines)


class _ShardWriter:
    """One shard's files under temporary names, renamed into place when complete."""

    def __init__(self, folder: Path, index: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.shard, self.prefix = index, folder / f"shard-{index:05d}"
        self.ids = IndexedDatasetBuilder(f"{self.prefix}.bin.tmp", dtype=np.int32)
        self.flags = IndexedDatasetBuilder(f"{self.prefix}.flags.bin.tmp", dtype=np.uint8)
        self.meta: list[np.ndarray] = []
        self.stats = LoadStats()
        self.tokens, self.max_id = 0, -1

    def add(self, chunk: dict) -> None:
        ptr = np.r_[0, np.cumsum(chunk["lengths"])]
        first = 0
        for count in chunk["per_line"]:  # one document per source line
            lo, hi = ptr[first], ptr[first + count]
            lengths = chunk["lengths"][first: first + count].tolist()
            self.ids.add_document(chunk["ids"][lo:hi], lengths)
            self.flags.add_document(chunk["flags"][lo:hi], lengths)
            first += count
        self.meta.append(chunk["meta"])
        for k, v in chunk["stats"].items():
            setattr(self.stats, k, getattr(self.stats, k) + v)
        self.tokens += len(chunk["ids"])
        if len(chunk["ids"]):
            self.max_id = max(self.max_id, int(chunk["ids"].max()))

    def finish(self, per_shard: int, total: int) -> dict:
        import io

        lines = (self.shard * per_shard + 1, min((self.shard + 1) * per_shard, total))
        p = self.prefix
        self.ids.finalize(f"{p}.idx.tmp")
        self.flags.finalize(f"{p}.flags.idx.tmp")
        buf = io.BytesIO()
        np.save(buf, np.concatenate(self.meta) if self.meta else np.zeros((0, 4), np.int32))
        write_bytes_atomic(Path(f"{p}.meta.npy"), buf.getvalue())
        for name in ("bin", "idx", "flags.bin", "flags.idx"):
            os.replace(f"{p}.{name}.tmp", f"{p}.{name}")
        done = {"name": p.name, "lines": list(lines), **self.stats.__dict__, "tokens": self.tokens,
                "max_token_id": self.max_id}
        write_text_atomic(Path(f"{p}.done"), json.dumps(done) + "\n")  # last: the shard is complete
        return done


def prepare(src: Path, out: Path, plan: dict, tok_dir: Path, d: DataConfig, workers: int) -> dict:
    """Prepare `src` into `out` (see the module's docstring); resumes a killed prepare with the
    same plan. Returns the manifest."""
    src, out = Path(src), Path(out)
    if (out / "manifest.json").is_file() and _read_json(out / "plan.json") == plan:
        return _read_json(out / "manifest.json")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "plan.json").is_file() and _read_json(out / "plan.json") != plan:
        log.warning("%s: prepared from something else (plan.json differs): starting over", out)
        for f in out.glob("shard-*"):
            f.unlink()
        (out / "manifest.json").unlink(missing_ok=True)
    write_text_atomic(out / "plan.json", json.dumps(plan, indent=1) + "\n")
    for f in out.glob("*.tmp"):  # a killed prepare's partial files
        f.unlink()
    total, per_shard = plan["source"]["lines"], plan["shard_lines"]
    n_shards = max(1, -(-total // per_shard))
    done = {i for i in range(n_shards) if (out / f"shard-{i:05d}.done").is_file()}
    if done:
        log.info("%s: resuming: %d of %d shards are complete", out, len(done), n_shards)
    args = (str(tok_dir), plan["kind"], d, plan["seq_length"] + 1, plan["vocab_size"], str(src))
    todo_lines = sum(min(per_shard, total - i * per_shard) for i in range(n_shards) if i not in done)
    workers = min(workers, -(-todo_lines // CHUNK_LINES))
    progress = _Progress(src.name, todo_lines, n_shards)
    if workers > 1:
        import multiprocessing as mp

        # spawn: the trainer that may call this holds threads and process groups; a fork of it
        # would inherit them.
        pool = mp.get_context("spawn").Pool(workers, _init_worker, args)
        render = lambda chunks: pool.imap(_render_in_worker, chunks)  # noqa: E731 (in order)
    else:
        pool, renderer = None, _Renderer(*args)
        render = lambda chunks: ((shard, renderer(lines)) for shard, lines in chunks)  # noqa: E731
    try:
        writer = None
        for shard, chunk in render(_chunks(src, per_shard, done)):
            if writer is None or writer.shard != shard:
                if writer is not None:
                    writer.finish(per_shard, total)
                writer = _ShardWriter(out, shard)
            writer.add(chunk)
            progress.update(shard, chunk["stats"]["lines"], len(chunk["ids"]))
            maybe_kill("prepare_chunk", progress.chunks - 1, pool.terminate if pool is not None else None)
        if writer is not None:
            writer.finish(per_shard, total)
        for shard in range(n_shards):  # shards of blank lines only
            if not (out / f"shard-{shard:05d}.done").is_file():
                _ShardWriter(out, shard).finish(per_shard, total)
    finally:
        if pool is not None:
            pool.terminate()
    manifest = _manifest(out, plan, n_shards)
    log.info("%s → %s: %s; %d tokens in %d shards (%.0f s)", src, out, _describe(manifest["counts"]),
             manifest["counts"]["tokens"], n_shards, time.perf_counter() - progress.start)
    return manifest


def _chunks(src: Path, per_shard: int, done: set[int]):
    """(shard, numbered non-blank lines) in chunks of at most CHUNK_LINES lines, one pass over the
    file, leaving out the shards in `done`."""
    chunk, shard = [], 0
    with open(src, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            shard = (n - 1) // per_shard
            if shard not in done and text.strip():
                chunk.append((n, text))
            if (n % CHUNK_LINES == 0 or n % per_shard == 0) and chunk:
                yield shard, chunk
                chunk = []
    if chunk:
        yield shard, chunk


def _manifest(out: Path, plan: dict, n_shards: int) -> dict:
    shards = [_read_json(out / f"shard-{i:05d}.done") for i in range(n_shards)]
    counts = {k: sum(s[k] for s in shards) for k in ("lines", "samples", "skipped_lines", "truncated",
                                                     "dropped", "tokens")}
    counts["max_token_id"] = max(s["max_token_id"] for s in shards)
    if not counts["samples"]:
        raise DataError(f"{plan['source']['name']}: no usable samples ({_describe(counts)})")
    manifest = {**plan, "shards": [s["name"] for s in shards], "shard_samples": [s["samples"] for s in shards],
                "counts": counts}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _describe(c: dict) -> str:
    return (f"{c['lines']} conversations → {c['samples']} samples; {c['skipped_lines']} malformed "
            f"lines skipped, {c['truncated']} truncated, {c['dropped']} dropped as over-length")


class _Progress:
    def __init__(self, name: str, total: int, shards: int):
        self.name, self.total, self.shards = name, total, shards
        self.start = self.shown = time.perf_counter()
        self.lines = self.tokens = self.chunks = 0

    def update(self, shard: int, lines: int, tokens: int) -> None:
        self.chunks += 1
        self.lines += lines
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.shown < PROGRESS_S and self.lines < self.total:
            return
        self.shown, spent = now, max(now - self.start, 1e-9)
        rate = self.lines / spent
        bar = "#" * int(20 * self.lines / max(self.total, 1))
        log.info("prepare %s: [%-20s] shard %d/%d, %d/%d conversations, %.0f conv/s, %.0f tokens/s, "
                 "ETA %.0f s", self.name, bar, shard + 1, self.shards, self.lines, self.total, rate,
                 self.tokens / spent, (self.total - self.lines) / max(rate, 1e-9))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


# ---- one writer at a time ----------------------------------------------------------------
@contextmanager
def locked(folder: Path):
    """An exclusive lock on `folder`'s lock file (beside it): runs started side by side on the
    same data (tests, a sweep's first steps) prepare it, and build a packing index, once. flock:
    on a shared file system it needs lock support (NFSv4, Lustre with -o flock)."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ---- waiting for another rank -------------------------------------------------------------
def error_file(folder: Path) -> Path:
    """Where rank 0 leaves the one-line error of a failed prepare for the ranks waiting on it
    (named by this launch, so a failure of an earlier launch is not read as this one's)."""
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or "local"
    return folder.parent / f"{folder.name}.error-{launch}"


def wait_for(path: Path, what: str, error: Path | None = None) -> None:
    """Poll for `path` (no collective: a rank that failed cannot hang the others)."""
    start = time.perf_counter()
    while not path.exists():
        if error is not None and error.is_file():
            raise DataError(error.read_text().strip())
        if time.perf_counter() - start > WAIT_S:
            raise DataError(f"waited {WAIT_S} s for {what}: is rank 0 alive, and the folder shared?")
        time.sleep(0.2)


# ---- reading ------------------------------------------------------------------------------
@dataclass
class _Shard:
    ids: object  # megatron IndexedDataset, int32
    flags: object  # megatron IndexedDataset, uint8
    meta: np.ndarray  # [samples, 4] int32, memory-mapped


class PreparedDataset:
    """A prepared folder as rows of at most seq_length + 1 tokens (data/batches.py), packed by a
    cached index. Token data stays on disk (memory-mapped); in memory: the sample lengths and
    the packing index."""

    def __init__(self, folder: Path, manifest: dict, shards: list[_Shard], ptr: np.ndarray,
                 members: np.ndarray):
        self.folder, self.manifest, self.shards = folder, manifest, shards
        self.kind = DataKind(manifest["kind"])
        self.first = np.r_[0, np.cumsum(manifest["shard_samples"])].astype(np.int64)
        self.ptr, self.members = ptr, members
        self.fill = manifest["counts"]["tokens"] / max(len(self) * (manifest["seq_length"] + 1), 1)

    def __len__(self) -> int:
        return len(self.ptr) - 1

    def _where(self, sample: int) -> tuple[_Shard, int]:
        s = int(np.searchsorted(self.first, sample, side="right")) - 1
        return self.shards[s], sample - int(self.first[s])

    def _rows(self, index: int) -> np.ndarray:
        r = index % len(self)
        return self.members[self.ptr[r]: self.ptr[r + 1]]

    def row_samples(self, index: int) -> list[ChatSample]:
        out = []
        for g in self._rows(index):
            shard, j = self._where(int(g))
            line, turn, prompt_len, mode = (int(x) for x in shard.meta[j])
            out.append(ChatSample(np.asarray(shard.ids.get(j)), prompt_len, mode, line, turn))
        return out

    def row(self, index: int, seq: int) -> Row:
        ids, flags = [], []
        for g in self._rows(index):
            shard, j = self._where(int(g))
            ids.append(shard.ids.get(j))
            flags.append(shard.flags.get(j))
        ids_, flags_ = np.concatenate(ids).astype(np.int64), np.concatenate(flags)
        # Position t predicts token t + 1: learned where that token is.
        mask = (flags_[1:] & LEARNED).astype(np.float32)
        if self.kind is DataKind.tokens:
            return Row(ids=ids_, mask=mask)
        segments = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
        return Row(ids=ids_, mask=mask, segments=segments, modes=(flags_[:-1] >> 1).astype(np.int64))


def open_prepared(folder: Path, tok, d: DataConfig, kind: DataKind, seq_length: int, vocab_size: int,
                  seed: int, build_index: bool) -> PreparedDataset:
    """A prepared folder, checked against this run (every rank checks, before any collective):
    its tokenizer's token map and chat template, seq_length, vocabulary width, the data settings
    that shape its content, and each shard's files. A mismatch is one DataError naming the file."""
    from qwen3kd.data.packing import cached_pack_index

    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataError(f"{folder}: not a prepared dataset (no manifest.json; `qwen3kd prepare` "
                        f"writes one, last)")
    m = _read_json(path)
    if m.get("format") != FORMAT:
        raise DataError(f"{path}: format {m.get('format')!r}, this qwen3kd reads {FORMAT!r}")
    if m["kind"] != kind.value:
        raise DataError(f"{path}: prepared as data.kind={m['kind']}, the config says {kind.value}")
    if m["seq_length"] != seq_length:
        raise DataError(f"{path}: prepared for seq_length {m['seq_length']} (its samples are cut to "
                        f"that), train.seq_length is {seq_length}: prepare it again")
    if m["counts"]["max_token_id"] >= vocab_size:
        raise DataError(f"{path}: token id {m['counts']['max_token_id']} >= model.vocab_size={vocab_size}")
    if tok is not None:
        mine = tokenizer_hashes(tok)
        for key, what in (("token_map_sha256", "token → id map"), ("chat_template_sha256", "chat template")):
            if kind is DataKind.tokens and key == "chat_template_sha256":
                continue
            if m["tokenizer"][key] != mine[key]:
                raise DataError(f"{path}: prepared with another tokenizer: its {what} differs from "
                                f"the student's (data.tokenizer); prepare it again with this one")
    settings = _content_settings(d, kind)
    for key, value in settings.items():
        if m["data"].get(key) != value:
            raise DataError(f"{path}: prepared with data.{key}={m['data'].get(key)}, the config says "
                            f"{value}: prepare it again")
    shards = [_open_shard(folder / name, n) for name, n in zip(m["shards"], m["shard_samples"], strict=True)]
    lengths = lambda: np.concatenate([s.ids.sequence_lengths for s in shards])  # noqa: E731
    pack = d.pack and kind is DataKind.chat
    ptr, members = cached_pack_index(folder, _dataset_id(m), lengths, seq_length + 1, pack,
                                     d.shuffle and kind is DataKind.chat, seed, build_index)
    data = PreparedDataset(folder, m, shards, ptr, members)
    log.info("%s: %s; %d rows of %d tokens (%.0f%% filled)", folder, _describe(m["counts"]), len(data),
             seq_length + 1, 100 * data.fill)
    return data


def _dataset_id(m: dict) -> str:
    return hashlib.sha256(json.dumps({k: m[k] for k in ("source", "tokenizer", "seq_length", "data", "kind")},
                                     sort_keys=True).encode()).hexdigest()


def _open_shard(prefix: Path, samples: int) -> _Shard:
    from megatron.core.datasets.indexed_dataset import IndexedDataset, _IndexReader

    def indexed(p: str, itemsize: int):
        idx, bin_ = Path(p + ".idx"), Path(p + ".bin")
        for f in (idx, bin_):
            if not f.is_file():
                raise DataError(f"{f}: missing (a prepared shard is .bin + .idx)")
        # The index alone first: megatron maps the .bin when it opens both, and an empty or
        # short one fails there with an error that does not say which file.
        try:
            index = _IndexReader(str(idx), multimodal=False)
        except (AssertionError, ValueError, OSError, struct.error) as e:
            raise DataError(f"{idx}: not a readable index: {e or type(e).__name__}") from None
        lengths, dtype = np.array(index.sequence_lengths), index.dtype
        del index
        expected = int(lengths.astype(np.int64).sum()) * itemsize
        size = bin_.stat().st_size
        if size != expected or len(lengths) != samples or np.dtype(dtype).itemsize != itemsize:
            raise DataError(f"{bin_}: {size} bytes, but its index {idx.name} describes {len(lengths)} "
                            f"sequences in {expected} bytes and the manifest {samples}: the .bin is "
                            f"truncated or the .idx belongs to other data")
        return IndexedDataset(p)

    ids = indexed(str(prefix), 4)
    flags = indexed(f"{prefix}.flags", 1)
    if not np.array_equal(ids.sequence_lengths, flags.sequence_lengths):
        raise DataError(f"{prefix}.flags.idx: not aligned with {prefix.name}.idx")
    meta_path = Path(f"{prefix}.meta.npy")
    try:
        meta = np.load(meta_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read: {e}") from None
    if meta.shape != (samples, 4):
        raise DataError(f"{meta_path}: shape {meta.shape}, expected ({samples}, 4)")
    return _Shard(ids, flags, meta)
