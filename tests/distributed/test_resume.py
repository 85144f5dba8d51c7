"""Training checkpoints resume exactly: a run killed with SIGKILL right after its step-3
checkpoint and resumed with `resume=auto` gives bitwise the losses of an uninterrupted run at
steps 4-6, with and without the distributed optimizer, dense and MoE. A run killed while writing
a checkpoint leaves the previous one chosen. The three distributed-optimizer patches are each
needed for this."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import SMOKE, qwen3kd

from qwen3kd.checkpoint.training import complete_checkpoints, latest
from qwen3kd.tracking import read_metrics

pytestmark = pytest.mark.distributed

SIX = ["train.steps=6", "checkpoint.interval=3"]
CASES = {
    "dense-dp2-distopt": ("lm-tiny-dense.yaml", ["parallel.distributed_optimizer=true"]),
    "dense-tp2": ("lm-tiny-dense.yaml", ["parallel.tensor=2"]),
    "moe-ep2-distopt": ("lm-tiny-moe.yaml", ["parallel.expert=2", "parallel.distributed_optimizer=true"]),
    "moe-pp2": ("lm-tiny-moe.yaml", ["parallel.pipeline=2"]),
}
KILL_AFTER_3 = {"QWEN3KD_FAULT": "after_checkpoint@3"}


def _losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir)]


def _train(config, layout, run_dir, *extra, env=None, check=True):
    return qwen3kd("train", str(SMOKE / config), *SIX, *layout, f"run.dir={run_dir}", *extra,
                   nproc=2, env=env, check=check)


@pytest.fixture(scope="module")
def killed_dense_distopt(tmp_path_factory):
    """The uninterrupted dense DP=2 distributed-optimizer run, and one killed after step 3."""
    root = tmp_path_factory.mktemp("distopt")
    config, layout = CASES["dense-dp2-distopt"]
    _train(config, layout, root / "full")
    p = _train(config, layout, root / "killed", env=KILL_AFTER_3, check=False)
    assert p.returncode != 0
    return root


@pytest.mark.parametrize("case", CASES)
def test_resume_after_sigkill_is_bitwise_exact(case, tmp_path, killed_dense_distopt):
    config, layout = CASES[case]
    if case == "dense-dp2-distopt":
        full, run = killed_dense_distopt / "full", tmp_path / "killed"
        shutil.copytree(killed_dense_distopt / "killed", run)
    else:
        full, run = tmp_path / "full", tmp_path / "killed"
        _train(config, layout, full)
        p = _train(config, layout, run, env=KILL_AFTER_3, check=False)
        assert p.returncode != 0, "the fault did not kill the run"
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]  # it died right after step 3
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [3]
    _train(config, layout, run, "resume=auto")
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert _losses(run) == _losses(full)  # bitwise, steps 1-3 from the first life, 4-6 resumed
    assert _losses(full)[5] < _losses(full)[0]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    config = str(SMOKE / "lm-tiny-dense.yaml")
    run = tmp_path / "run"
    p = qwen3kd("train", config, *SIX, f"run.dir={run}", check=False,
                env={"QWEN3KD_FAULT": "during_checkpoint@6"})
    assert p.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step_0000006.tmp").is_dir()  # the interrupted save, data written, not renamed
    assert latest(ckpts) == ckpts / "step_0000003"
    qwen3kd("train", config, *SIX, f"run.dir={run}", "resume=auto")
    qwen3kd("train", config, *SIX, f"run.dir={tmp_path / 'full'}")
    assert _losses(run) == _losses(tmp_path / "full")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000003", "step_0000006"]


def test_keep_last_and_resume_of_a_finished_run(tmp_path):
    """A student started from a Hugging Face folder: its files travel into every checkpoint, also
    after the checkpoint a run resumed from has been pruned."""
    from hf_models import save_tiny_hf

    from qwen3kd.config.loader import load_config

    config = SMOKE / "lm-tiny-dense.yaml"
    hf = save_tiny_hf(load_config(config).model, tmp_path / "hf")
    args = [str(config), "train.steps=4", "optim.warmup_steps=1", "checkpoint.interval=1",
            "checkpoint.keep_last=1", f"checkpoint.load={hf}", f"run.dir={tmp_path / 'run'}"]
    qwen3kd("train", *args)
    ckpts = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [4]
    # Extending and re-tuning the run: the schedule (length and rates) comes from the config, the
    # position from the checkpoint (whose optimizer state also holds the old rates).
    qwen3kd("train", *args, "train.steps=6", "resume=auto", "optim.lr=2e-3", "optim.min_lr=2e-4")
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics[4:]:  # megatron's cosine after 1 warmup step, decaying until step 6
        progress = (m["step"] - 1 - 1) / (6 - 1)
        assert m["train/lr"] == pytest.approx(2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert [s for s, _ in complete_checkpoints(ckpts)] == [6]
    assert (ckpts / "step_0000006" / "hf" / "config.json").read_bytes() == (hf / "config.json").read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch Adam path (no TE / Apex)")
@pytest.mark.parametrize("patch,error", [
    ("distopt_fresh_state", "AssertionError"),
    ("distopt_load_step", "KeyError: 'step'"),
    ("distopt_shared_step", None),  # no error: the resumed run silently diverges
])
def test_distributed_optimizer_resume_needs_patch(patch, error, tmp_path, killed_dense_distopt):
    config, layout = CASES["dense-dp2-distopt"]
    run = tmp_path / "killed"
    shutil.copytree(killed_dense_distopt / "killed", run)
    p = _train(config, layout, run, "resume=auto", env={"QWEN3KD_SKIP_PATCHES": patch}, check=False)
    if error:
        assert p.returncode != 0 and error in p.stderr
    else:
        assert p.returncode == 0
        full = _losses(killed_dense_distopt / "full")
        assert _losses(run)[3] == full[3]  # the first resumed step uses the loaded state
        assert abs(_losses(run)[5] - full[5]) > 1e-4  # then Adam's shared step counter bites
