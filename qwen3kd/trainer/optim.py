"""Megatron DDP wrapping, the (distributed) Adam optimizer and the warmup + decay LR schedule."""

from __future__ import annotations

import torch

from qwen3kd.config.schema import JobConfig, LRDecay, Precision
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.trainer.phases import total_steps


def wrap_ddp(chunks: list[torch.nn.Module], cfg: JobConfig, layout: ParallelLayout):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=layout.distributed_optimizer,
        overlap_grad_reduce=False,
        check_for_nan_in_grad=True,
    )
    return [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_cfg, module=chunk,
            # Only the first chunk gets bucketed: later chunks' grads are reduced with it.
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(model: list[torch.nn.Module], cfg: JobConfig, layout: ParallelLayout):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    bf16 = cfg.train.precision is not Precision.fp32
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, model)
    # A 0-step run (e.g. one that only writes initial weights) still needs a valid schedule.
    steps = max(o.decay_steps or total_steps(cfg), o.warmup_steps + 1)  # over all phases
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr if o.decay is not LRDecay.constant else o.lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=o.decay.value,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        # On resume the config decides the schedule's shape (a run can be extended), the
        # checkpoint its position.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
