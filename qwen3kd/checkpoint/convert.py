"""`qwen3kd convert`: a Hugging Face folder ↔ a Megatron distributed checkpoint, streamed.

Both directions work on the model built on the meta device at TP = PP = EP = 1 (names and shapes,
no storage) and materialise one *unit* at a time (the embedding, one decoder layer, the final
norm, the output layer):
- HF → Megatron: the checkpoint is planned from the meta model; each tensor is produced only when
  its bytes are written: its layer is read from the safetensors shards and merged through the
  mapping table (hf_mapping.py), then dropped. Megatron's loader reshards it at any TP / PP / EP.
- Megatron → HF (a `convert` output or a training checkpoint's student): megatron's loader reads
  one layer's slices of the global tensors, the table splits them into Hugging Face tensors, and
  safetensors shards are written as they fill.
Peak memory is about one layer plus one output file, whatever the model size (README: measured).

The Hugging Face non-weight files (config.json, tokenizer, generation_config.json, chat template)
travel unchanged: into DST/hf/ one way, back to the folder the other way. The output appears
under its name only when complete (written as DST.tmp and renamed); on any error it is removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from qwen3kd.checkpoint.dcp import SyncSave, read_regions
from qwen3kd.checkpoint.hf import INDEX, SINGLE, HFCheckpoint, arch_fields, copy_hf_files
from qwen3kd.checkpoint.hf_mapping import TABLES, Heads, find_rule, merge, split
from qwen3kd.checkpoint.manifest import (
    architecture,
    check_model,
    differences,
    read_manifest,
    write_manifest,
)
from qwen3kd.config.schema import JobConfig, LayerImpl, ModelConfig, ParallelConfig, TrainConfig
from qwen3kd.errors import DataError, UserError
from qwen3kd.memory import return_freed_memory

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ---- the meta model, one unit at a time -----------------------------------------------------
def _unit_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["decoder", "layers"] else parts[0] + "." + parts[1]


class _Units:
    """The meta model's parameters grouped by unit (model order), materialised one at a time."""

    def __init__(self, model: torch.nn.Module, model_cfg: ModelConfig):
        # parameter name → its current tensor: a meta placeholder, or real while materialised.
        self.tensors = {n: p.detach() for n, p in model.named_parameters()}
        self.entries: dict[str, dict] = {}  # unit → {parameter name: ShardedTensor / factory}
        for name, entry in model.sharded_state_dict().items():
            if name in self.tensors:  # (not the `_extra_state` objects)
                self.entries.setdefault(_unit_of(name), {})[name] = entry
        self.table = TABLES[_architecture_name(model_cfg)]
        self.heads = Heads(model_cfg.num_attention_heads, model_cfg.num_key_value_heads,
                           model_cfg.head_dim)
        self.names = list(self.entries)
        self.unit_index: dict[tuple, int] = {}  # (checkpoint key, global offset) → unit number
        for i, unit in enumerate(self.names):
            for sh in self.built(unit):
                self.unit_index[(sh.key, tuple(sh.global_offset))] = i
        self.current: str | None = None
        self.cache: dict[tuple, torch.Tensor] = {}

    def built(self, unit: str) -> list:
        """The unit's ShardedTensors, factories applied, over the parameters' current data."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        d = {}
        for name, entry in self.entries[unit].items():
            entry.data = self.tensors[name]
            d[name] = entry
        apply_factories(d)
        return [v for v in nested_values(d) if isinstance(v, ShardedTensor)]

    def hf_parts(self, name: str) -> tuple[list[str], str]:
        rule, layer, expert = find_rule(self.table, name)
        return rule.hf_names(layer, expert), rule.merge

    def set_data(self, unit: str, make: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
        self.release()
        for name in self.entries[unit]:
            self.tensors[name] = make(name, self.tensors[name])
        self.current = unit

    def release(self) -> None:
        if self.current is not None:
            for name, entry in self.entries[self.current].items():
                self.tensors[name] = entry.data = _meta_like(self.tensors[name])
        self.current, self.cache = None, {}


def _meta_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(t.shape, dtype=dtype or t.dtype, device="meta")


def _architecture_name(model: ModelConfig) -> str:
    return "Qwen3MoeForCausalLM" if model.num_experts else "Qwen3ForCausalLM"


def _meta_model(model_cfg: ModelConfig) -> torch.nn.Module:
    from qwen3kd.models.qwen3 import build_model

    cfg = JobConfig(model=model_cfg, train=TrainConfig(layer_impl=LayerImpl.local))
    (model,) = build_model(cfg, _layout(model_cfg), meta=True)
    return model


def _layout(model_cfg: ModelConfig):
    from qwen3kd.distributed.layout import ParallelLayout

    return ParallelLayout.from_config(ParallelConfig(world_size=1), model_cfg, 1)


def start(model_cfg: ModelConfig) -> None:
    """The one-process torch.distributed world megatron's checkpointing needs (or the caller's,
    if it already has one without model parallelism)."""
    import torch.distributed as dist

    import megatron_patches

    return_freed_memory()
    megatron_patches.apply_all()
    if not dist.is_initialized():
        _layout(model_cfg).init(seed=0)
        return
    from megatron.core import parallel_state as ps

    sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size())
    if sizes != (1, 1, 1):
        raise RuntimeError(f"convert runs at TP = PP = EP = 1; this process has {sizes}")


# ---- output directories ---------------------------------------------------------------------
class _Output:
    """DST written as DST.tmp, renamed into place when complete, removed on any error."""

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        if self.dst.exists():
            raise UserError(f"{self.dst}: already exists; remove it or choose another destination")
        self.tmp = self.dst.with_name(self.dst.name + ".tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.tmp.rename(self.dst)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---- Hugging Face → Megatron ----------------------------------------------------------------
def hf_to_megatron(src: Path, dst: Path, preset: ModelConfig | None = None,
                   file_bytes: int | None = None) -> None:
    """`file_bytes`: size of the output files (default: the largest layer's), which is what the
    writer holds at once."""
    from megatron.core import dist_checkpointing

    hf = HFCheckpoint(src)
    model_cfg = hf.model_config(name=preset.name if preset else Path(src).name)
    if preset is not None:
        diffs = differences(preset, arch_fields(hf.config), "config.json", ours="preset")
        if diffs:
            raise DataError(f"{hf.path}/config.json does not match the preset: " + "; ".join(diffs))
    missing = hf.missing_files()
    if missing:
        raise DataError(f"{missing[0]}: shard file missing (listed in {hf.path / INDEX})")
    with _Output(dst) as tmp:
        start(model_cfg)
        model = _meta_model(model_cfg)
        units = _Units(model, model_cfg)
        _check_hf_tensors(hf, units)
        file_bytes = file_bytes or max(
            sum(units.tensors[n].numel() * units.tensors[n].element_size() for n in entries)
            for entries in units.entries.values())

        def read(name: str, _: torch.Tensor) -> torch.Tensor:
            hf_names, how = units.hf_parts(name)
            return merge(how, [hf.get(n) for n in hf_names], units.heads)

        def resolve(key: str, offset: tuple[int, ...]) -> torch.Tensor:
            unit = units.names[units.unit_index[(key, offset)]]
            if unit != units.current:
                units.set_data(unit, read)
                units.cache = {(sh.key, tuple(sh.global_offset)): sh.data for sh in units.built(unit)}
            return units.cache[(key, offset)]

        def order(item) -> int:
            return units.unit_index.get((item.index.fqn, tuple(item.index.offset or ())), -1)

        plan = model.sharded_state_dict()
        for name, entry in plan.items():
            if name in units.tensors:
                entry.data = units.tensors[name]  # meta, with the stored dtype
        dist_checkpointing.save(plan, str(tmp), sharded_strategy=SyncSave(resolve, order, file_bytes))
        units.release()
        hf.close()
        copy_hf_files(hf.path, tmp / "hf")
        write_manifest(tmp, "weights", model_cfg, source=str(Path(src).resolve()))
    log.info("wrote %s (Megatron distributed checkpoint, loadable at any TP / PP / EP)", dst)


def _check_hf_tensors(hf: HFCheckpoint, units: _Units) -> None:
    """Every tensor the model needs is there with the right shape; nothing is left over. Then
    each parameter's meta dtype is the stored one, so the checkpoint keeps it bit for bit."""
    used = set()
    for name, p in units.tensors.items():
        hf_names, how = units.hf_parts(name)
        expected = split(how, p, units.heads)
        dtypes = set()
        for n, want in zip(hf_names, expected, strict=True):
            shape = hf.shape(n)
            if shape != tuple(want.shape):
                raise DataError(f"{hf.path}: tensor '{n}' (in {hf.weight_map[n]}) has shape {shape}, "
                                f"the model from config.json needs {tuple(want.shape)}")
            dtypes.add(hf.dtype(n))
        if len(dtypes) != 1:
            raise DataError(f"{hf.path}: tensors {hf_names} mix dtypes {sorted(map(str, dtypes))}")
        units.tensors[name] = _meta_like(p, dtypes.pop())
        used.update(hf_names)
    extra = sorted(set(hf.names()) - used)
    if extra:
        raise DataError(f"{hf.path}: {len(extra)} tensor(s) the Qwen3 mapping does not use, e.g. "
                        f"'{extra[0]}': not a plain {hf.architecture} checkpoint")


# ---- Megatron → Hugging Face ----------------------------------------------------------------
def megatron_model_config(src: Path, preset: ModelConfig | None) -> ModelConfig:
    manifest = read_manifest(src)
    if manifest is None:
        if preset is None:
            raise UserError(f"{src}: no qwen3kd.json; say which model it holds with --model PRESET")
        return preset
    if preset is not None:
        check_model(src, preset)
    return ModelConfig(name=manifest.get("model_name") or Path(src).name, **manifest["architecture"])


def megatron_to_hf(src: Path, dst: Path, preset: ModelConfig | None = None,
                   dtype: torch.dtype | None = None, shard_bytes: int = 5 * 10**9) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    src = Path(src)
    if not (src / "metadata.json").is_file():
        raise DataError(f"{src}: not a Megatron distributed checkpoint (no metadata.json)")
    model_cfg = megatron_model_config(src, preset)
    hf_files = src / "hf" if (src / "hf" / "config.json").is_file() else None
    with _Output(dst) as tmp:
        start(model_cfg)
        stored = FileSystemReader(str(src)).read_metadata().state_dict_metadata
        model = _meta_model(model_cfg)
        units = _Units(model, model_cfg)
        missing = sorted({key for key, _ in units.unit_index} - set(stored))
        if missing:
            raise DataError(f"{src}: tensor '{missing[0]}' is missing")
        for unit in units.entries:  # meta dtypes = stored dtypes
            for name, entry in units.entries[unit].items():
                units.tensors[name] = _meta_like(units.tensors[name], stored[entry.key].properties.dtype)
        out_dtype = dtype or _config_dtype(hf_files) or next(iter(units.tensors.values())).dtype
        writer = _SafetensorsWriter(tmp, _plan_files(units, out_dtype, shard_bytes))
        for unit in units.entries:
            units.set_data(unit, lambda name, t: torch.empty(t.shape, dtype=t.dtype))
            read_regions(src, units.built(unit))  # fills the unit's tensors (factories: views)
            loaded = units.tensors
            for name in units.entries[unit]:
                hf_names, how = units.hf_parts(name)
                for n, t in zip(hf_names, split(how, loaded[name], units.heads), strict=True):
                    writer.add(n, t.to(out_dtype))
            units.release()
        writer.finish()
        write_hf_config(tmp, hf_files, model_cfg, out_dtype)
    log.info("wrote %s (Hugging Face %s, %s)", dst, _architecture_name(model_cfg), out_dtype)


def _config_dtype(hf_files: Path | None) -> torch.dtype | None:
    if hf_files is None:
        return None
    c = json.loads((hf_files / "config.json").read_text())
    name = c.get("dtype") or c.get("torch_dtype")
    return {v: k for k, v in _HF_DTYPE_NAMES.items()}.get(name)


def _plan_files(units: _Units, dtype: torch.dtype, shard_bytes: int) -> list[list[str]]:
    """Hugging Face tensor names per output file, in model order, each file ≤ shard_bytes
    (a tensor larger than that gets a file of its own)."""
    files, size = [[]], 0
    for unit in units.entries:
        for name in units.entries[unit]:
            hf_names, how = units.hf_parts(name)
            for n, t in zip(hf_names, split(how, units.tensors[name], units.heads), strict=True):
                nbytes = t.numel() * dtype.itemsize
                if files[-1] and size + nbytes > shard_bytes:
                    files.append([])
                    size = 0
                files[-1].append(n)
                size += nbytes
    return files


class _SafetensorsWriter:
    """Writes each planned file as soon as its last tensor arrives; then the index."""

    def __init__(self, out: Path, files: list[list[str]]):
        self.out, self.files = out, files
        self.file_of = {n: i for i, names in enumerate(files) for n in names}
        self.buffer: dict[int, dict[str, torch.Tensor]] = {}
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def name(self, i: int) -> str:
        return SINGLE if len(self.files) == 1 else f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"

    def add(self, hf_name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        i = self.file_of[hf_name]
        buf = self.buffer.setdefault(i, {})
        buf[hf_name] = tensor.contiguous()
        if len(buf) == len(self.files[i]):
            save_file(buf, str(self.out / self.name(i)), metadata={"format": "pt"})
            for n, t in buf.items():
                self.weight_map[n] = self.name(i)
                self.total += t.numel() * t.element_size()
            del self.buffer[i]

    def finish(self) -> None:
        if self.buffer:
            raise RuntimeError(f"unwritten tensors: {[n for b in self.buffer.values() for n in b]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_config(out: Path, hf_files: Path | None, model: ModelConfig, dtype: torch.dtype) -> None:
    """config.json (and the tokenizer files) of a Hugging Face folder for `model`: carried over
    from `hf_files` when known, else written from the model config."""
    if hf_files is not None:
        copy_hf_files(hf_files, out)
        config = json.loads((out / "config.json").read_text())
        if _config_dtype(hf_files) in (None, dtype):
            return  # carried over byte for byte
    else:
        moe = bool(model.num_experts)
        config = {"architectures": [_architecture_name(model)],
                  "model_type": "qwen3_moe" if moe else "qwen3", **architecture(model),
                  "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
                  "initializer_range": model.init_std, "use_cache": True}
        if moe:
            config.update(decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                          router_aux_loss_coef=model.router_aux_loss_coef)
        else:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
                config.pop(k)
    for key in ("torch_dtype", "dtype"):
        if key in config or hf_files is None:
            config[key] = _HF_DTYPE_NAMES[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
