"""Lineage of a run: short, stable hashes of what went into it, and config flattening for params.

`checkpoint_fingerprint` names a checkpoint's content cheaply (it reads at most 2 MiB per file,
whatever the checkpoint's size), `text_hash` / `vocab_hash` name a chat template and a tokenizer
vocabulary, and `flatten` turns a nested config into the `"optim.lr": 3e-4` form MLflow params take.
No MLflow import here: these are plain values a run records (as tags) or compares.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path

_HEX = 16  # 64 bits: plenty to tell apart the checkpoints of one project, short enough to read
_EDGE = 1 << 20  # bytes hashed at each end of a large file
_SMALL = 2 * _EDGE  # files below this are hashed whole (configs, indexes, tokenizer files)
# Not content: caches and locks that tools write next to a checkpoint (the Hugging Face
# `.cache/huggingface/download/*.metadata` files hold download timestamps), and a git clone's
# object store, which duplicates the files themselves.
_SKIP_DIRS = frozenset({".cache", ".git", "__pycache__"})
_SKIP_SUFFIXES = (".lock", ".tmp", ".incomplete", ".pyc")
_SKIP_NAMES = frozenset({".DS_Store"})


def checkpoint_fingerprint(path: Path) -> str:
    """A 16-hex-digit fingerprint of a checkpoint folder's content (HF or Megatron torch_dist).

    Hashed, for every file under `path` (recursively, in sorted relative-path order, symlinked
    files followed as HF cache snapshots use them): its relative path, its size, and the sha256
    of its bytes — all of them for files under 2 MiB (config.json, index and metadata files,
    qwen3kd.json, torch DCP's `.metadata`), else only the first and the last MiB.

    Detects: an added, removed or renamed file; a changed size; any change in a small file; a
    change in the first or last MiB of a large one — which holds a safetensors header (tensor
    names, dtypes, shapes, offsets) and the first tensor's leading bytes, so a retrained or
    re-converted checkpoint, whose every tensor differs, is always told apart.
    Does not detect: a same-size change confined to the middle of a large shard (e.g. one bit
    flipped or one tensor edited in place), nor empty folders. Skipped as volatile: `.cache/`,
    `.git/`, `__pycache__/`, `*.lock`, `*.tmp`, `*.incomplete`, `*.pyc`, `.DS_Store`.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"checkpoint_fingerprint: {root} is not a folder")
    outer = hashlib.sha256()
    for rel in _content_files(root):
        f = root / rel
        size = f.stat().st_size
        outer.update(f"{rel}\0{size}\0{_sample_digest(f, size)}\n".encode())
    return outer.hexdigest()[:_HEX]


def _content_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files under `root` that `checkpoint_fingerprint` covers."""
    found = []
    # followlinks=False: a symlinked folder could loop; symlinked files are still read.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES):
                continue
            found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _sample_digest(f: Path, size: int) -> str:
    h = hashlib.sha256()
    with f.open("rb") as fh:
        if size < _SMALL:
            h.update(fh.read())
        else:
            h.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            h.update(fh.read(_EDGE))
    return h.hexdigest()


def text_hash(s: str) -> str:
    """sha256 of the UTF-8 text, 16 hex digits (e.g. of a chat template)."""
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:_HEX]


def vocab_hash(token_to_id: Mapping[str, int]) -> str:
    """sha256 of the vocabulary's (token, id) pairs sorted by token, 16 hex digits.

    Independent of the mapping's insertion order; any added, removed or renumbered token changes it.
    """
    items = sorted((str(t), int(i)) for t, i in token_to_id.items())
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:_HEX]


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """A nested config as flat dotted keys, the form MLflow params take.

    `{"optim": {"lr": 1}, "data": {"paths": ["a", "b"]}}`
    → `{"optim.lr": 1, "data.paths": '["a", "b"]'}`.

    Nested mappings (dicts, OmegaConf DictConfig) become dotted keys; a list or tuple becomes one
    value, its JSON text (elements that JSON cannot hold written with `str`); an Enum becomes its
    value; other leaves are kept as they are. An empty mapping has no leaves and gives no key.
    """
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        elif _is_list(v):
            out[key] = json.dumps(_plain(v), default=str)
        else:
            out[key] = v.value if isinstance(v, Enum) else v
    return out


def _is_list(v: object) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes, bytearray))


def _plain(v: object) -> object:
    """Nested mappings / sequences as dicts / lists (OmegaConf's are not JSON-serializable)."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if _is_list(v):
        return [_plain(x) for x in v]
    return v.value if isinstance(v, Enum) else v
