"""The config system: defaults in dataclasses, YAML deltas with includes, strict overrides,
cross-field validation with errors that name the keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from qwen3kd.config.loader import load_config, save_resolved
from qwen3kd.config.schema import Precision, RouterMode
from qwen3kd.config.validate import validate
from qwen3kd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
# `_*.yaml`: fragments other configs include, not jobs of their own.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("_"))
TINY = ROOT / "configs" / "smoke" / "lm-tiny-dense.yaml"
TINY_MOE = ROOT / "configs" / "smoke" / "lm-tiny-moe.yaml"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"qwen3-0.6b.yaml", "qwen3-235b-a22b.yaml", "tiny-dense.yaml", "lm-tiny-moe.yaml"} <= names


def _runtime_overrides(path, request) -> list[str]:
    """Configs that read built assets (`runs/toy-assets/…`, as their comments say to build) get
    them from the fixture, and the world size their layout is launched with."""
    from qwen3kd.config.loader import _layers

    found: dict[str, str] = {}
    par = {"tensor": 1, "pipeline": 1}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, str) and v.startswith("runs/toy-assets/"):
                found[f"{prefix}{k}"] = v.removeprefix("runs/toy-assets/")

    for _, layer in _layers(path):
        walk(layer, "")
        par.update({k: v for k, v in layer.get("parallel", {}).items() if k in par})
    if not found:
        return []
    a = request.getfixturevalue("toy_assets")
    return [f"{key}={a / rel}" for key, rel in found.items()] + [
        f"parallel.world_size={par['tensor'] * par['pipeline']}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_yaml_loads_and_validates(path, request):
    # The cluster recipes (opd-*) name paths on a cluster: their files are not checked here (their
    # --dry-run is, in test_recipes.py).
    check = not path.name.startswith("opd-")
    cfg = load_config(path, _runtime_overrides(path, request), check_files=check)
    assert cfg.model.name  # every config names its model (directly or through an include)
    validate(cfg, check_files=check)


def test_include_then_own_keys_then_overrides_win():
    cfg = load_config(TINY, ["train.steps=7", "parallel.tensor=2", "parallel.world_size=2"])
    assert cfg.model.hidden_size == 64  # from the included preset
    assert cfg.train.seq_length == 32  # from the smoke file itself
    assert cfg.train.steps == 7  # from the override
    assert cfg.optim.adam_beta2 == 0.95  # dataclass default
    assert cfg.train.precision is Precision.fp32
    assert cfg.model.router is RouterMode.aux_loss
    assert cfg.run.dir == "runs/lm-tiny-dense"  # interpolation resolved


def test_config_is_read_only():
    cfg = load_config(TINY)
    with pytest.raises(ReadonlyConfigError):
        cfg.train.steps = 3


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["train.steps=5", "run.name=x"])
    out = save_resolved(cfg, tmp_path)
    again = load_config(out)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["parallel.tensr=2"], "unknown config key 'parallel.tensr' (did you mean 'parallel.tensor'?)"),
        (["trian.steps=2"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["train.steps=abc"], "bad value for 'train.steps'"),
        (["train.precision=fp16"], "bad value for 'train.precision'"),
        (["train.steps"], "not of the form key=value"),
        (["parallel.tensor=3", "parallel.world_size=3"],
         "parallel.tensor=3 does not divide model.num_attention_heads=4"),
        (["parallel.tensor=4", "parallel.world_size=4"],
         "parallel.tensor=4 exceeds model.num_key_value_heads=2"),
        (["parallel.tensor=2"], "world size 1 is not divisible by parallel.tensor × parallel.pipeline"),
        (["parallel.pipeline=3", "parallel.world_size=3"],
         "parallel.pipeline=3 does not divide model.num_hidden_layers=4"),
        (["parallel.expert=2", "parallel.world_size=2"], "parallel.expert=2 needs an MoE model"),
        (["parallel.context=2"], "context parallelism) is not supported"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor > 1"),
        (["parallel.world_size=2", "train.global_batch_size=6", "train.micro_batch_size=2"],
         "train.micro_batch_size × data-parallel size = 2 × 2 must divide train.global_batch_size=6"),
        (["train.seq_length=4096"], "train.seq_length=4096 exceeds model.max_position_embeddings=512"),
        (["data.kind=tokens"], "data.kind=tokens needs data.path"),
        (["data.kind=tokens", "data.path=/nonexistent/x.jsonl"], "data.path: not found: /nonexistent/x.jsonl"),
        (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load: directory not found"),
        (["train.precision=fp8"], "train.precision=fp8 needs Transformer Engine"),
        (["model.num_key_value_heads=3"], "model.num_key_value_heads=3 must divide model.num_attention_heads=4"),
    ],
)
def test_bad_input_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["parallel.expert=3", "parallel.world_size=3"], "parallel.expert=3 does not divide model.num_experts=4"),
        (["parallel.tensor=2", "parallel.world_size=2"], "needs parallel.sequence_parallel=true"),
        (["parallel.expert=4", "parallel.world_size=2"], "must divide tensor × data parallel"),
        (["model.num_experts_per_tok=5"], "model.num_experts_per_tok=5 must be in 1..model.num_experts"),
    ],
)
def test_bad_moe_layouts_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_MOE, overrides)
    assert expected in str(e.value)


def test_world_size_from_launcher_must_match(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"parallel.world_size=4 but the launcher started 2"):
        load_config(TINY, ["parallel.world_size=4"])
    assert load_config(TINY).parallel.world_size is None  # taken from WORLD_SIZE: dp = 2


def test_uneven_pipeline_is_accepted_when_stages_are_given():
    cfg = load_config(TINY, ["parallel.pipeline=3", "parallel.world_size=3",
                             "parallel.first_stage_layers=2"])
    assert validate(cfg).pp == 3
    with pytest.raises(ConfigError, match="first_stage_layers=9 must be in 1..3"):
        load_config(TINY, ["parallel.pipeline=2", "parallel.world_size=2",
                           "parallel.first_stage_layers=9"])


def test_errors_in_yaml_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("include: [../nope.yaml]\n")
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(bad)
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_include_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_model_is_required(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("train:\n  steps: 1\n")
    with pytest.raises(ConfigError, match="required config key"):
        load_config(empty)


def test_a_preset_included_under_a_key_becomes_the_teachers_model(tmp_path):
    exp = tmp_path / "kd.yaml"
    exp.write_text(f"include: [{ROOT}/configs/models/qwen3-0.6b.yaml, "
                   f"{ROOT}/configs/models/qwen3-32b.yaml@teacher]\nteacher:\n  offload: true\n")
    cfg = load_config(exp)
    assert cfg.model.name == "qwen3-0.6b" and cfg.teacher.model.name == "qwen3-32b"
    assert cfg.teacher.model.num_hidden_layers == 64 and cfg.teacher.offload
    # teacher.parallel.pipeline is null: the teacher takes the student's 3 stages, which do not
    # split its layers (it has no uneven stages).
    with pytest.raises(ConfigError, match=r"^teacher.parallel.pipeline=3 does not divide "
                                          r"teacher.model.num_hidden_layers=64$"):
        load_config(exp, ["parallel.pipeline=3", "parallel.world_size=3",
                          "parallel.first_stage_layers=10", "parallel.last_stage_layers=9"])
    with pytest.raises(ConfigError, match="kd: temperature must be > 0"):
        load_config(exp, ["kd.temperature=0"])
