"""Hugging Face Qwen3 folders: read lazily, describe as a ModelConfig, load into megatron models.

Loading is direct and layout-aware: each rank reads, tensor by tensor, only the Hugging Face
tensors of the layers and experts it holds (safetensors reads lazily), merges them with the
mapping table and keeps its tensor-parallel slice. Peak extra memory is about one layer's tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from qwen3kd.checkpoint.hf_mapping import TABLES, Heads, find_rule, merge, shard
from qwen3kd.checkpoint.manifest import ARCH_FIELDS, differences
from qwen3kd.config.schema import ModelConfig
from qwen3kd.errors import DataError

# config.json fields that hold for every Qwen3 checkpoint and that the mapping table assumes.
ASSUMED = {"hidden_act": "silu", "attention_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": []}
INDEX = "model.safetensors.index.json"
_OPEN_SHARDS = 1
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
SINGLE = "model.safetensors"
class HFCheckpoint:
    """A Hugging Face model folder: config.json plus safetensors (one file, or shards + index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise DataError(f"{cfg_file}: not found (not a Hugging Face model folder)")
        self.config = json.loads(cfg_file.read_text())
        arch = (self.config.get("architectures") or ["?"])[0]
        if arch not in TABLES:
            raise DataError(f"{cfg_file}: unsupported architecture '{arch}' (supported: {', '.join(TABLES)})")
        self.architecture = arch
        bad = unsupported(self.config)
        if bad:
            raise DataError(f"{cfg_file}: " + "; ".join(bad))
        self.weight_map = self._weight_map()
        self._open: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        single = self.path / SINGLE
        if not single.is_file():
            raise DataError(f"{self.path}: neither {INDEX} nor {SINGLE} found")
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {k: SINGLE for k in f.keys()}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str):
        from safetensors import safe_open

        file = self.weight_map.get(name)
        if file is None:
            raise DataError(f"{self.path}: tensor '{name}' is missing")
        if file not in self._open:
            shard_path = self.path / file
            if not shard_path.is_file():
                raise DataError(f"{shard_path}: shard file missing (needed for tensor '{name}')")
            # One shard mapped at a time: readers go layer by layer, and a mapped shard's pages
            # count in the process's resident memory.
            while len(self._open) >= _OPEN_SHARDS:
                self._open.pop(next(iter(self._open)))
            self._open[file] = safe_open(shard_path, "pt")
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi of a tensor, reading only those bytes."""
        return self._handle(name).get_slice(name)[lo:hi]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor, from the shard's header (no data read)."""
        return _DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def missing_files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self.weight_map.values()))
                if not (self.path / f).is_file()]

    def close(self) -> None:
        self._open.clear()

    def model_config(self, name: str | None = None) -> ModelConfig:
        return ModelConfig(name=name or self.path.name, **arch_fields(self.config))


def arch_fields(config: dict) -> dict:
    """The architecture fields of a config.json, whichever transformers version wrote it
    (5.x writes `num_local_experts` and `rope_parameters.rope_theta`; the Qwen3 releases
    `num_experts` and `rope_theta`)."""
    c = dict(config)
    if "num_local_experts" in c:
        c.setdefault("num_experts", c["num_local_experts"])
    if isinstance(c.get("rope_parameters"), dict) and "rope_theta" in c["rope_parameters"]:
        c.setdefault("rope_theta", c["rope_parameters"]["rope_theta"])
    if "head_dim" not in c and "hidden_size" in c:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    return {k: c[k] for k in ARCH_FIELDS if k in c}


def unsupported(config: dict) -> list[str]:
    """config.json fields whose values the Qwen3 mapping does not handle, one line each."""
    return [f"{key}: config.json has {config[key]!r}; qwen3kd supports only {expected!r}"
            for key, expected in ASSUMED.items() if key in config and config[key] != expected]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _global_name(chunk: torch.nn.Module, name: str) -> tuple[str, bool]:
    """Local parameter name → name with global layer / expert indices; is it an expert param?
    Ranks come from the model's own groups (a teacher's are not megatron's global ones)."""
    m = _LAYER.match(name)
    if m:
        layer = chunk.decoder.layers[int(m.group(1))].layer_number - 1  # 1-based, global
        name = f"decoder.layers.{layer}." + name[m.end():]
    e = _EXPERT.search(name)
    if e:
        ep = chunk.pg_collection.ep
        per_rank = chunk.config.num_moe_experts // ep.size()
        glob = ep.rank() * per_rank + int(e.group(1))
        name = name[: e.start()] + f".local_experts.{glob}." + name[e.end():]
    return name, e is not None


@torch.no_grad()
def load_hf_into(chunks: list[torch.nn.Module], ckpt: HFCheckpoint, model: ModelConfig) -> None:
    """Fill this rank's megatron model chunks from a Hugging Face checkpoint (each its slice, by
    the ranks in its own process groups)."""
    from megatron.core.utils import unwrap_model

    diffs = differences(model, arch_fields(ckpt.config), "config.json")
    if diffs:
        raise DataError(f"{ckpt.path}/config.json does not match the model config: " + "; ".join(diffs))
    table = TABLES[ckpt.architecture]
    heads = Heads(model.num_attention_heads, model.num_key_value_heads, model.head_dim)
    tied = model.tie_word_embeddings
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        for local, param in chunk.named_parameters():
            name, is_expert = _global_name(chunk, local)
            rule, layer, expert = find_rule(table, name)
            hf_names = rule.hf_names(layer, expert)
            if tied and hf_names == ["lm_head.weight"]:
                hf_names = ["model.embed_tokens.weight"]  # the last stage's copy of the embedding
            full = merge(rule.merge, [ckpt.get(n) for n in hf_names], heads)
            group = chunk.pg_collection.expt_tp if is_expert else chunk.pg_collection.tp
            rank, size = group.rank(), group.size()
            part = shard(rule.shard, full, rank, size)
            if part.shape != param.shape:
                raise DataError(
                    f"{ckpt.path}: tensor {', '.join(hf_names)} gives shape {tuple(part.shape)} for "
                    f"'{name}' at tp rank {rank}/{size}, the model expects {tuple(param.shape)}"
                )
            param.copy_(part.to(param.dtype))
    ckpt.close()


def copy_hf_files(src: Path, dst: Path) -> None:
    """A Hugging Face folder's non-weight files (config.json, tokenizer, generation config, chat
    template), byte for byte."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and not is_weight_file(f.name):
            shutil.copy2(f, dst / f.name)


def is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json",
                          ".bin.index.json"))
