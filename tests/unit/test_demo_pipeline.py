"""Pieces of `qwen3kd demo` that need no stage to run: the depth-pruned student and the config
checks (the whole pipeline runs in tests/e2e/test_demo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen3kd.config.loader import load_config
from qwen3kd.demo.pipeline import Demo, depth_pruned
from qwen3kd.errors import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "demo-arithmetic-cpu.yaml"


def test_depth_pruned_student_is_the_teacher_without_the_dropped_layers(tmp_path, toy_assets):
    from transformers import Qwen3ForCausalLM

    from qwen3kd.toy import random_qwen3, save_hf

    teacher_cfg = load_config(DEMO).teacher.model
    teacher = random_qwen3(teacher_cfg, seed=3).eval()
    save_hf(teacher, tmp_path / "teacher", toy_assets / "tokenizer")
    student = Qwen3ForCausalLM.from_pretrained(depth_pruned(tmp_path / "teacher", tmp_path / "s", [0, 3])).eval()
    assert student.config.num_hidden_layers == 2 and (tmp_path / "s" / "tokenizer_config.json").is_file()
    # The teacher, run with only layers 0 and 3, computes what the student computes.
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[0], teacher.model.layers[3]])
    teacher.config.num_hidden_layers = 2
    ids = torch.tensor([[5, 17, 40, 99, 3, 250]])
    with torch.no_grad():
        assert torch.equal(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits)


@pytest.mark.parametrize("overrides, message", [
    (["demo.student_layers=[1,1]"], r"increasing teacher layer indices in 0\.\.3"),
    (["demo.student_layers=[0,4]"], r"increasing teacher layer indices"),
    (["demo.student_layers=[0,2,3]"], r"num_hidden_layers \(student 2, 3 layers kept\)"),
    (["model.intermediate_size=256"], r"differs in intermediate_size"),
    (["onpolicy.steps=0"], r"onpolicy.steps must be > 0"),
    (["onpolicy.group_size=1"], r"onpolicy.group_size=1: the RL arm \(GRPO\) needs >= 2"),
    (["demo.curve_interval=-1"], r"demo.curve_interval and demo.dev_problems must be >= 0"),
    (["demo.rl_lr_scale=0"], r"demo.rl_lr_scale must be > 0, got 0"),
    (["demo.dev_problems=0"], r"demo.curve_interval > 0 needs demo.dev_problems > 0"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Demo(load_config(DEMO, overrides), DEMO)
