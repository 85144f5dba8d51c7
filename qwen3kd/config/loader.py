"""YAML → overrides → validated, read-only JobConfig.

A YAML file is a delta on the dataclass defaults. It may start with `include: [a.yaml, …]`
(paths relative to the including file), merged in order before the file's own keys; that is how an
experiment picks a model preset. `PATH@KEY` merges the file under KEY instead of at the top: a
preset's `model:` becomes the teacher's with `include: [../models/qwen3-32b.yaml@teacher]`. Command-line overrides are OmegaConf dotlist `key=value` items.
Everything runs in struct mode, so an unknown key anywhere is an error that names it.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from qwen3kd.config.schema import JobConfig
from qwen3kd.errors import ConfigError
from qwen3kd.files import write_text_atomic

INCLUDE_KEY = "include"


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _layers(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The YAML deltas to merge for `path`, includes first (depth-first, in order)."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"include cycle: {chain}")
    data = _read_yaml(path)
    includes = data.pop(INCLUDE_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError(f"{path}: '{INCLUDE_KEY}' must be a list of paths")
    out: list[tuple[Path, dict]] = []
    for inc in includes:
        if not isinstance(inc, str):
            raise ConfigError(f"{path}: '{INCLUDE_KEY}' items must be paths, got {inc!r}")
        file, _, under = inc.partition("@")
        for src, layer in _layers(path.parent / file, (*stack, path)):
            for key in reversed(under.split(".") if under else []):
                layer = {key: layer}
            out.append((src, layer))
    out.append((path, data))
    return out


def _valid_keys(node: DictConfig) -> list[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line naming the key and, for a typo, the closest key."""
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        parent_path, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        close = difflib.get_close_matches(leaf, _valid_keys(parent), n=1)
        hint = f" (did you mean '{(parent_path + '.') if parent_path else ''}{close[0]}'?)" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        msg = str(getattr(err, "msg", err)).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {str(err).splitlines()[0]}")


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                check_files: bool = True, layout: bool = True) -> JobConfig:
    """Merge defaults ← YAML (with includes) ← overrides; validate (the paths too unless
    `check_files` is false; only the data keys without `layout`: a command that runs in one
    process for any layout, `qwen3kd prepare`); return it read-only."""
    # Imported here: validate needs the layout, which needs the model schema (not torch).
    from qwen3kd.config.validate import validate, validate_data

    schema = OmegaConf.structured(JobConfig)
    cfg = schema.copy()
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.tracking.tags, False)  # free-form: any tag name
    for src, data in _layers(Path(path)) if path else []:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(src)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{item}'") from None
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        raise _explain(e, schema, str(path or "config")) from None
    if missing:
        raise ConfigError(f"{path or 'config'}: required config key(s) not set: {', '.join(missing)}")
    if layout:
        validate(cfg, check_files=check_files)
    else:
        validate_data(cfg, check_files)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # a DictConfig typed like JobConfig (attribute access, enums kept)


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_resolved(cfg: JobConfig, run_dir: Path) -> Path:
    """Write the resolved config into the run directory, atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
