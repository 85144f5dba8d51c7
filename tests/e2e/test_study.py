"""`qwen3kd study run` end to end on the tiny demo (configs/smoke/demo-tiny.yaml). *recoverable*:
the variant's data carries slips with their checks, the teacher gate runs in vLLM before any arm —
and fails, as it must for a teacher trained 4 steps — which voids the variant for every seed (the
second seed is not run); the report says so, the MLflow parent holds the protocol's version and
commit, and a second `study run` reruns nothing. *scarce*: which prompts each stage uses, and the
control's steps matched to on-policy distillation's FLOPs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import SMOKE, qwen3kd

from qwen3kd.study.run import TEST_SET_LOCK, TEST_SET_TAG, VOID

REPO = SMOKE.parents[1]
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")


def test_recoverable_gate_voids_the_variant(tmp_path):
    from mlflow import MlflowClient

    root = tmp_path / "study"
    overrides = [f"run.dir={root}", f"demo.cache={tmp_path / 'cache'}", "study.variants=[recoverable]",
                 "study.seeds=[7,8]", f"study.protocol={REPO / 'study/protocol.md'}", "demo.gate_problems=40"]
    done = qwen3kd("study", "run", str(SMOKE / "demo-tiny.yaml"), *overrides, timeout=600)
    assert "teacher gate failed" in done.stderr and "the recoverable variant is void" in done.stderr
    assert (root / "recoverable" / VOID).is_file()
    gate = json.loads((root / "recoverable" / "seed-7" / "gate.json").read_text())
    assert gate["passed"] is False and gate["corrupted"] == gate["clean"] == 20
    assert not (root / "recoverable" / "seed-7" / "offpolicy").exists()  # no arm ran
    assert not (root / "recoverable" / "seed-8").exists()
    # The variant's ground truth: think traces with a slip, its check line, the slip without loss.
    assets = next((tmp_path / "cache").glob("assets-*"))
    slipped = [m for m in (json.loads(x)["messages"][1] for x in (assets / "truth.jsonl").read_text().splitlines())
               if "no_loss" in m]
    assert slipped and all("\ncheck: " in m["reasoning_content"] and m["no_loss"][0] in m["reasoning_content"]
                           for m in slipped)
    report = json.loads((root / "report.json").read_text())
    assert {r["decision"] for r in report["hypotheses"]} == {"void"}
    assert "| void |" in done.stdout
    # Every run carries the protocol's version and the commit that last changed it.
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H", "--", "study/protocol.md"],
                            capture_output=True, text=True).stdout.strip()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    version = re.search(r"\*\*Protocol version (\d+)\*\*", (REPO / "study/protocol.md").read_text())[1]
    assert runs and all(r.data.tags.get("qwen3kd.protocol_version") == version for r in runs)
    assert all(r.data.tags.get("qwen3kd.protocol_commit") == commit for r in runs)
    kinds = {r.data.tags.get("qwen3kd.study") or r.data.tags.get("qwen3kd.demo") or r.info.run_name for r in runs}
    assert {"parent", "teacher"} <= kinds
    # Resumable: nothing reruns.
    again = qwen3kd("study", "run", str(SMOKE / "demo-tiny.yaml"), *overrides, timeout=300)
    assert "demo: teacher" not in again.stderr and "| void |" in again.stdout


def test_scarce_variant_matches_the_controls_flops_to_on_policy_distillation(tmp_path):
    """*scarce*: the teacher answers only answered.jsonl for the off-policy data; the on-policy
    arms run on the fresh pool (prompts.jsonl); the teacher then answers that pool (`fresh`) and
    the control continues on those answers for the steps whose ledger FLOPs plus the teacher's
    generation of what they learn match onpolicy's; the unit evaluates only what its seed
    changes; the report tests H3."""
    from qwen3kd.config.loader import load_config
    from qwen3kd.models.params import count_params
    from qwen3kd.tracking import read_metrics

    root = tmp_path / "study"
    overrides = [f"run.dir={root}", f"demo.cache={tmp_path / 'cache'}", "study.variants=[scarce]", "study.seeds=[7]",
                 f"study.protocol={REPO / 'study/protocol.md'}", "demo.eval_fixed_models=false",
                 "demo.scarce.answered_prompts=8", "demo.scarce.prompts=32", "onpolicy.steps=3", "study.phase=test"]
    done = qwen3kd("study", "run", str(SMOKE / "demo-tiny.yaml"), *overrides, timeout=900)
    unit = root / "scarce" / "seed-7"
    summary = json.loads((unit / "summary.json").read_text())

    def stage(name: str) -> dict:
        import yaml

        return yaml.safe_load((unit / name / "stage.yaml").read_text())

    assets = Path(stage("generate")["generate"]["prompts"]).parent
    assert stage("generate")["generate"]["prompts"] == str(assets / "answered.jsonl")
    assert stage("fresh")["generate"]["prompts"] == str(assets / "prompts.jsonl")
    assert stage("onpolicy")["onpolicy"]["prompts"] == str(assets / "prompts.jsonl")
    assert stage("control")["data"]["path"] == str(unit / "fresh" / "generated.jsonl")
    assert stage("offpolicy")["data"]["path"] == str(unit / "generate" / "generated.jsonl")
    # The control's steps, derived here from the ledgers the stages wrote.
    n_teacher = count_params(load_config(SMOKE / "demo-tiny.yaml").teacher.model).active
    off = [r for r in read_metrics(unit / "offpolicy") if "compute/flops" in r]
    per_step = sum(r["compute/flops"] + 2 * n_teacher * r["train/tokens"] for r in off) / len(off)
    opd = sum(r["compute/flops"] for r in read_metrics(unit / "onpolicy") if "compute/flops" in r)
    steps = max(1, round(opd / per_step))
    assert summary["matched"]["steps"] == summary["steps"]["control"] == steps
    control = [r for r in read_metrics(unit / "control") if "compute/flops" in r]
    assert [r["step"] for r in control] == list(range(4, 4 + steps))
    generation = sum(2 * n_teacher * r["train/tokens"] for r in control)
    assert summary["compute"]["control"]["generation_flops"] == pytest.approx(generation)
    assert summary["compute"]["control"]["flops"] == pytest.approx(generation + sum(r["compute/flops"] for r in control))
    assert summary["compute"]["onpolicy"]["generation_flops"] == 0
    # Only what the seed changes is evaluated.
    assert set(summary["models"]) == {"offpolicy", "control", "onpolicy", "rl"}
    report = json.loads((root / "report.json").read_text())
    h3 = [r for r in report["hypotheses"] if r["id"] == "H3"]
    assert [r["mode"] for r in h3] == ["think", "no_think"] and all(r["seeds"] == [7] for r in h3)
    assert "| H3 | scarce | think |" in done.stdout
    # The test phase: the unit answered the locked test set, whose hash every run carries.
    from mlflow import MlflowClient

    sha = (root / TEST_SET_LOCK).read_text().strip()
    assert summary["eval_set"] == "test" and report["test_set_sha256"] == sha
    assert sha == hashlib.sha256((assets / "eval.jsonl").read_bytes()).hexdigest()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    units = [r for r in runs if r.data.tags.get("qwen3kd.study") != "parent"]
    assert units and all(r.data.tags.get(TEST_SET_TAG) == sha and r.data.tags.get("qwen3kd.study_phase") == "test"
                         for r in units)
