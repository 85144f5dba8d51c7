"""qwen3kd on a real SLURM: slurmctld and two slurmd as fake nodes on this host
(launch/slurm/cluster.sh, brought up for these tests and stopped after them), jobs submitted with
launch/slurm/qwen3kd.sbatch, 2 nodes × 1 process (gloo).

- a 2-node job of the tiny MoE at EP=2 gives the losses of launch/torchrun.sh 2;
- preemption: `scancel --signal=USR1 --batch` mid-run stops it at the next step with a complete
  checkpoint; the script requeues it; the rerun resumes and every step's loss is bitwise that of
  an uninterrupted run; the same for a run past train.exit_after_minutes;
- a job killed without warning and resubmitted resumes from its last complete checkpoint;
- bad input to `qwen3kd submit` fails before anything is queued.
Where no cluster can be brought up (not root, no apt-get) they are skipped with the reason.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, SMOKE, _env, last_checkpoint, onpolicy_args, qwen3kd

from qwen3kd.tracking import read_metrics

pytestmark = pytest.mark.slurm
CLUSTER = ROOT / "launch" / "slurm" / "cluster.sh"
SBATCH = ROOT / "launch" / "slurm" / "qwen3kd.sbatch"


@pytest.fixture(scope="module")
def slurm():
    p = subprocess.run([str(CLUSTER), "up", "2"], capture_output=True, text=True, timeout=600)
    if p.returncode == 3:  # not root / no apt-get: say why, do not pass silently
        pytest.skip(f"no local SLURM cluster: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    conf = p.stdout.strip().splitlines()[-1].split("=", 1)[1]
    env = {**_env(), "SLURM_CONF": conf}
    yield env
    subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


def sbatch(env, out: Path, *args: str, extra_env: dict | None = None) -> str:
    p = subprocess.run(["sbatch", "--parsable", "-N", "2", f"--output={out}/%j.log", str(SBATCH),
                        *args], cwd=ROOT, env={**env, **(extra_env or {})}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def wait_gone(env, job: str, timeout: float = 400) -> None:
    """Until the job has left the queue (finished, failed or cancelled, requeues included)."""
    end = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                         text=True).stdout.strip():
        assert time.time() < end, f"job {job} still queued after {timeout} s"
        time.sleep(1)


def wait_steps(run_dir: Path, n: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not (run_dir / "metrics.jsonl").is_file() or len(read_metrics(run_dir)) < n:
        assert time.time() < end, f"{run_dir}: fewer than {n} steps after {timeout} s"
        time.sleep(0.3)


def losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss (records without one: the weight sync's, logged at the step it follows)."""
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def kd(a: Path, run_dir: Path, *extra: str) -> list[str]:
    """The off-policy smoke config at student TP=1 × DP=2 (one process on each node)."""
    return [str(SMOKE / "offpolicy-tiny.yaml"), f"data.path={a / 'train.jsonl'}",
            f"data.eval_path={a / 'eval.jsonl'}", f"data.tokenizer={a / 'tokenizer'}",
            f"teacher.load={a / 'teacher'}", "parallel.tensor=1", "train.steps=8",
            "eval.interval=0", "tracking.enabled=false", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def reference(toy_assets, tmp_path_factory) -> dict[int, float]:
    """The per-step losses of the uninterrupted run (torchrun, the jobs' layout)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    qwen3kd("train", *kd(toy_assets, run), nproc=2)
    return losses(run)


def test_two_node_moe_ep2_job_matches_torchrun(slurm, tmp_path):
    args = [str(SMOKE / "lm-tiny-moe.yaml"), "parallel.expert=2", "train.steps=3",
            "optim.warmup_steps=1", "checkpoint.save_final=false"]
    job = sbatch(slurm, tmp_path, "train", *args, f"run.dir={tmp_path / 'slurm'}")
    local = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "2", *args,
                            f"run.dir={tmp_path / 'local'}"], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    wait_gone(slurm, job)
    log = (tmp_path / f"{job}.log").read_text()
    assert "on 2 nodes × 1 processes" in log, log[-3000:]
    a, b = losses(tmp_path / "slurm"), losses(tmp_path / "local")
    assert sorted(a) == [1, 2, 3], log[-3000:]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)


def test_usr1_stops_requeues_and_resumes_bitwise(slurm, toy_assets, reference, tmp_path):
    job = sbatch(slurm, tmp_path, "train", *kd(toy_assets, tmp_path / "cut"))
    wait_steps(tmp_path / "cut", 2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_gone(slurm, job)
    log = (tmp_path / f"{job}.log").read_text()
    assert "requeueing job" in log and f"job {job}, start 2" in log, log[-4000:]
    stopped = [line for line in log.splitlines() if "stopped at step" in line]
    assert len(stopped) == 2, log[-4000:]  # both ranks, at the same step
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert 2 <= step < 8 and f"resumed from {tmp_path / 'cut'}/checkpoints/step_{step:07d}" in log
    assert losses(tmp_path / "cut") == reference and len(reference) == 8
    assert last_checkpoint(tmp_path / "cut").name == "step_0000008"


def test_deadline_stops_and_requeues_until_the_restarts_run_out(slurm, toy_assets, reference,
                                                               tmp_path):
    """A deadline already past at the first step boundary of every start: start 1 stops at step
    1 and is requeued, start 2 stops at step 2 and (QWEN3KD_MAX_RESTARTS=1) ends with code 75; a
    new job without the deadline ends the run like an uninterrupted one."""
    run = tmp_path / "deadline"
    job = sbatch(slurm, tmp_path, "train", *kd(toy_assets, run, "train.exit_after_minutes=0.001"),
                 extra_env={"QWEN3KD_MAX_RESTARTS": "1"})
    wait_gone(slurm, job)
    log = (tmp_path / f"{job}.log").read_text()
    assert "stopped at step 1 (train.exit_after_minutes reached)" in log, log[-4000:]
    assert "stopped at step 2 (train.exit_after_minutes reached)" in log, log[-4000:]
    assert "restarts are used up" in log and last_checkpoint(run).name == "step_0000002"
    wait_gone(slurm, sbatch(slurm, tmp_path, "train", *kd(toy_assets, run)))
    assert losses(run) == reference


def test_a_killed_job_resubmitted_resumes_from_its_last_complete_checkpoint(slurm, toy_assets,
                                                                            reference, tmp_path):
    run = tmp_path / "killed"
    job = sbatch(slurm, tmp_path, "train", *kd(toy_assets, run, "checkpoint.interval=2"))
    wait_steps(run, 5)
    subprocess.run(["scancel", "--signal=KILL", job], env=slurm, check=True)
    wait_gone(slurm, job)
    assert "requeueing" not in (tmp_path / f"{job}.log").read_text()  # no warning, no requeue
    saved = last_checkpoint(run).name
    again = sbatch(slurm, tmp_path, "train", *kd(toy_assets, run, "checkpoint.interval=2"))
    wait_gone(slurm, again)
    assert f"resumed from {run}/checkpoints/{saved}" in (tmp_path / f"{again}.log").read_text()
    assert losses(run) == reference


def test_bad_input_fails_before_anything_is_queued(slurm, toy_assets, tmp_path):
    before = subprocess.run(["squeue", "-h"], env=slurm, capture_output=True, text=True).stdout
    cases = {
        ("train.stepz=3",): "unknown config key 'train.stepz'",
        ("parallel.world_size=4",): "parallel.world_size=4 but the launcher started 2 processes",
        ("parallel.tensor=4",): "parallel.tensor=4 exceeds model.num_key_value_heads=2",
    }
    for extra, message in cases.items():
        p = qwen3kd("submit", *kd(toy_assets, tmp_path / "bad"), *extra, "--nodes", "2",
                    check=False, env={"SLURM_CONF": slurm["SLURM_CONF"]})
        assert p.returncode == 2 and "sbatch" not in p.stdout, p.stdout + p.stderr
        assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr, p.stderr
    after = subprocess.run(["squeue", "-h"], env=slurm, capture_output=True, text=True).stdout
    assert before == after == ""


def test_an_onpolicy_run_stopped_in_its_onpolicy_phase_resumes_bitwise(slurm, toy_assets, onpolicy_run,
                                                                      tmp_path):
    """2 off-policy steps, then on-policy steps 3..5 (vLLM on rank 0): USR1 once the on-policy
    phase has begun, while rank 0 starts the engine (tens of seconds, so the signal is sure to land
    between step 2's stop check and step 3's; three toy on-policy steps take about 2 s, too short a
    window to aim a signal at reliably). The run stops after step 3, its first on-policy step, the
    engine is shut down, and the requeued job starts it again from the resumed weights. Every
    step's loss equals the uninterrupted run's (tests/conftest.py's onpolicy_run, the same settings
    on one node)."""
    cut = tmp_path / "cut"
    job = sbatch(slurm, tmp_path, "train", *onpolicy_args(toy_assets), "tracking.enabled=false",
                 f"run.dir={cut}")
    log_file, end = tmp_path / f"{job}.log", time.time() + 300
    while not (log_file.is_file() and "phase onpolicy: steps 3..5" in log_file.read_text()):
        assert time.time() < end, "no on-policy phase after 300 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_gone(slurm, job, timeout=600)
    log = (tmp_path / f"{job}.log").read_text()
    assert "stopped at step 3 (SIGUSR1)" in log and f"job {job}, start 2" in log, log[-4000:]
    assert f"resumed from {cut}/checkpoints/step_0000003" in log, log[-4000:]
    assert losses(cut) == losses(onpolicy_run) and sorted(losses(cut)) == [1, 2, 3, 4, 5]
