"""The megatron patches that only show under two ranks: without each, `qwen3kd train` fails
(or, for the aux-loss bug, silently trains differently); with it, the parity tests pass."""

from __future__ import annotations

import pytest
import torch
from helpers import SMOKE, global_weights, last_checkpoint, qwen3kd

from qwen3kd.tracking import read_metrics

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")]

ONE_STEP = ["train.steps=1", "train.global_batch_size=4", "train.micro_batch_size=1",
            "optim.warmup_steps=0"]


@pytest.mark.parametrize(
    "patch,config,layout,error",
    [
        ("cuda_sync", "lm-tiny-dense.yaml", ["parallel.pipeline=2"],
         "Torch not compiled with CUDA enabled"),
        ("a2a_splits", "lm-tiny-moe.yaml", ["parallel.expert=2"],
         "all_to_all_single(): incompatible function arguments"),
    ],
)
def test_two_rank_patch_is_needed(patch, config, layout, error, tmp_path):
    p = qwen3kd("train", str(SMOKE / config), *ONE_STEP, *layout, f"run.dir={tmp_path}",
                nproc=2, check=False, env={"QWEN3KD_SKIP_PATCHES": patch})
    assert p.returncode != 0
    assert error in p.stderr


def test_moe_aux_loss_under_sequence_parallel_is_weighted_like_one_process(tmp_path):
    """Without the fix, TP=2+SP trains the router with half the load-balancing gradient: same
    losses, different router weights. With it, router weights match a one-process run."""
    common = [str(SMOKE / "lm-tiny-moe.yaml"), "train.steps=2", "train.global_batch_size=2",
              "train.micro_batch_size=1", "optim.adam_eps=1e-5", "optim.warmup_steps=0",
              "optim.lr=1e-3", "model.router_aux_loss_coef=0.1"]
    init = tmp_path / "init"
    qwen3kd("train", *common, "train.steps=0", f"run.dir={init}")
    load = f"checkpoint.load={last_checkpoint(init)}"
    qwen3kd("train", *common, load, f"run.dir={tmp_path / 'ref'}")
    sp = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
    qwen3kd("train", *common, load, *sp, f"run.dir={tmp_path / 'fixed'}", nproc=2)
    qwen3kd("train", *common, load, *sp, f"run.dir={tmp_path / 'stock'}", nproc=2,
            env={"QWEN3KD_SKIP_PATCHES": "moe_aux_loss_sp"})
    key = "decoder.layers.mlp.router.weight"
    ref, fixed, stock = (global_weights(last_checkpoint(tmp_path / r))[key]
                         for r in ("ref", "fixed", "stock"))
    assert (fixed - ref).abs().max() <= 1e-5
    assert (stock - ref).abs().max() > 1e-4
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / r)] for r in ("ref", "stock")]
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-5)  # step 1 forward is identical
