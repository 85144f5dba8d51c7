"""Pieces of `qwen3kd demo` that need no stage to run: the depth-pruned student and the config
checks (the whole pipeline runs in tests/e2e/test_demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen3kd.config.loader import load_config
from qwen3kd.demo.pipeline import Demo, depth_pruned, generation_flops, matched_steps
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
    (["demo.test_seed=9001"], r"demo.test_seed and demo.dev_seed: set both"),
    (["demo.variant=scarce", "demo.scarce.answered_prompts=0"], r"demo.scarce.answered_prompts and demo.scarce.prompts"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Demo(load_config(DEMO, overrides), DEMO)


def _held_out(tmp_path, *overrides: str) -> dict[str, list[str]]:
    small = ["demo.train_problems=300", "demo.prompts=100", "demo.eval_problems=200", "demo.dev_problems=60"]
    cfg = load_config(DEMO, [f"demo.cache={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}", *small, *overrides])
    assets = Demo(cfg, DEMO).assets()
    questions = {}
    for name in ("truth", "prompts", "eval", "dev", "answered"):
        if not (assets / f"{name}.jsonl").is_file():
            continue
        lines = [json.loads(x) for x in (assets / f"{name}.jsonl").read_text().splitlines()]
        questions[name] = [x["messages"][0]["content"] for x in lines]
    return questions


def test_locked_held_out_sets_have_seeds_of_their_own(tmp_path):
    """demo.test_seed / dev_seed (the study's locked sets): the test set is the same file whatever
    demo.seed draws for training; test, dev and training problems are pairwise disjoint."""
    locked = ["demo.test_seed=9001", "demo.dev_seed=9002"]
    a = _held_out(tmp_path / "a", *locked, "demo.seed=0")
    b = _held_out(tmp_path / "b", *locked, "demo.seed=1")
    assert a["eval"] == b["eval"] and a["dev"] == b["dev"] and a["truth"] != b["truth"]
    assert len(set(a["eval"])) == 200 and len(set(a["dev"])) == 60 and not set(a["eval"]) & set(a["dev"])
    for q in (a, b):
        assert not (set(q["truth"]) | set(q["prompts"])) & (set(q["eval"]) | set(q["dev"]))
    # Without them the held-out problems come from demo.seed, as they always have.
    c = _held_out(tmp_path / "c", "demo.seed=0")
    assert c["eval"] != a["eval"] and not (set(c["truth"]) | set(c["prompts"])) & (set(c["eval"]) | set(c["dev"]))


def test_recoverable_variant_adds_a_forward_kl_arm_on_the_same_rollouts():
    plain, rec = Demo(load_config(DEMO), DEMO), Demo(load_config(DEMO, ["demo.variant=recoverable"]), DEMO)
    assert plain.arms == ("control", "onpolicy", "rl") and rec.arms == (*plain.arms, "onpolicy_fkl")
    assert rec.models[-1] == "onpolicy_fkl" and "onpolicy_fkl" not in plain.models
    start = Path("/runs/demo/offpolicy/checkpoints/step_0000250")
    opd, fkl = rec.arm_changes("onpolicy", start), rec.arm_changes("onpolicy_fkl", start)
    # The same run as on-policy distillation (prompts, modes and sampling seeds: rollout.seed, the
    # same in both) but for the KL's direction; the on-policy default is reverse KL.
    assert rec.base["onpolicy"]["kd_kind"] == "reverse_kl" and opd["onpolicy.objective"] == "kd"
    assert fkl == {**opd, "onpolicy.kd_kind": "forward_kl"}


def test_scarce_variant_answers_few_prompts_and_keeps_the_on_policy_prompts_fresh(tmp_path):
    """*scarce*: answered.jsonl (the teacher's few, the off-policy data) and prompts.jsonl (the
    on-policy arms' and the control's fresh answers') share no problem, and neither shares one
    with the held-out sets."""
    q = _held_out(tmp_path, "demo.variant=scarce", "demo.scarce.answered_prompts=40", "demo.scarce.prompts=150",
                  "demo.test_seed=9001", "demo.dev_seed=9002")
    assert len(q["answered"]) == 40 and len(q["prompts"]) == 150 and not set(q["answered"]) & set(q["prompts"])
    used = set(q["truth"]) | set(q["answered"]) | set(q["prompts"])
    assert not used & (set(q["eval"]) | set(q["dev"]))
    assert q["eval"] == _held_out(tmp_path / "plain", "demo.test_seed=9001", "demo.dev_seed=9002")["eval"]


def test_scarce_control_steps_match_onpolicy_flops_with_the_teachers_generation_charged():
    # Off-policy steps of 10 GFLOPs learning 1,000 answer tokens each; a 2M-parameter teacher
    # generates 4 GFLOPs of them (2 × 2e6 × 1,000): 14 GFLOPs a control step.
    rows = [{"step": s, "compute/flops": 1e10, "train/tokens": 1000.0} for s in range(1, 5)] + [{"step": 5}]
    assert generation_flops(rows[:4], 2_000_000) == 4 * 4e9
    m = matched_steps(700e9, rows, 2_000_000)
    assert m["steps"] == 50 and m["step_flops"] == 14e9 and abs(m["generation_share"] - 4 / 14) < 1e-12
    assert matched_steps(1e9, rows, 2_000_000)["steps"] == 1  # never 0 steps
    # Without the charge the control would get 70 steps, not 50.
    assert matched_steps(700e9, rows, 0)["steps"] == 70


def test_a_study_unit_evaluates_only_what_its_seed_changes():
    cfg = load_config(DEMO, ["demo.eval_fixed_models=false"])
    assert Demo(cfg, DEMO).models == ("offpolicy", "control", "onpolicy", "rl")
    assert Demo(load_config(DEMO), DEMO).models[:2] == ("teacher", "student-before")
