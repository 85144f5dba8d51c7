"""`qwen3kd study run` end to end on the tiny demo (configs/smoke/demo-tiny.yaml) in the
*recoverable* variant: the variant's data carries slips with their checks, the teacher gate runs
in vLLM before any arm — and fails, as it must for a teacher trained 4 steps — which voids the
variant for every seed (the second seed is not run); the report says so, the MLflow parent holds
the protocol's version and commit, and a second `study run` reruns nothing."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import SMOKE, qwen3kd

from qwen3kd.study.run import VOID

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
    assert runs and all(r.data.tags.get("qwen3kd.protocol_version") == "1" for r in runs)
    assert all(r.data.tags.get("qwen3kd.protocol_commit") == commit for r in runs)
    kinds = {r.data.tags.get("qwen3kd.study") or r.data.tags.get("qwen3kd.demo") or r.info.run_name for r in runs}
    assert {"parent", "teacher"} <= kinds
    # Resumable: nothing reruns.
    again = qwen3kd("study", "run", str(SMOKE / "demo-tiny.yaml"), *overrides, timeout=300)
    assert "demo: teacher" not in again.stderr and "| void |" in again.stdout
