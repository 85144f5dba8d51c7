"""The training loop: causal-LM cross-entropy on the student (distillation plugs in its loss here).

Each phase of a step is a named method; the loop itself reads like the algorithm.
Loss normalisation: every micro-batch returns a *sum* over its valid tokens and its token count;
megatron's schedule adds the counts over micro-batches, `finalize_model_grads` all-reduces them over
data-parallel ranks and divides the gradients by the total, so the gradient is that of the mean
over all valid tokens of the global batch (DESIGN.md, "Normalisation").
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from qwen3kd.checkpoint import training
from qwen3kd.checkpoint.weights import hf_files_of, load_initial_weights
from qwen3kd.config.schema import JobConfig
from qwen3kd.data.lm import MicroBatch, micro_batches, open_dataset
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.models.qwen3 import build_model
from qwen3kd.tracking import JsonlMetrics, MetricsLogger, NullMetrics
from qwen3kd.trainer.optim import build_optimizer, wrap_ddp

log = logging.getLogger(__name__)


def lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the per-token CE over valid tokens, and their count.  # [B, S] → scalars"""
    mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * mask).sum()
    n = mask.sum().to(torch.int)
    return loss_sum, n, {"lm_loss": torch.stack([loss_sum.detach(), n.float()])}


def forward_step(data_iterator, model):
    batch: MicroBatch = next(data_iterator)
    dev = _device()
    tokens, pos, labels = (t.to(dev, non_blocking=True)
                           for t in (batch.tokens, batch.position_ids, batch.labels))
    out = model(tokens, pos, None, labels=labels)  # [B, S] per-token CE
    return out, partial(lm_loss, batch.loss_mask.to(dev, non_blocking=True))


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: JobConfig, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        self.run_dir = Path(cfg.run.dir)

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads

        cfg = self.cfg
        self.layout.init(cfg.train.seed)
        chunks = build_model(cfg, self.layout)
        resume = self._resume_path()
        self.hf_source = None  # the student's Hugging Face files, carried into its checkpoints
        if resume is None and cfg.checkpoint.load:
            load_initial_weights(chunks, Path(cfg.checkpoint.load), cfg.model)
            self.hf_source = hf_files_of(Path(cfg.checkpoint.load))
            log.info("loaded weights from %s", cfg.checkpoint.load)
        self.model = wrap_ddp(chunks, cfg, self.layout)
        mcfg = chunks[0].config
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            mcfg.no_sync_func = mcfg.no_sync_func[0]
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.layout)
        self.progress, self.saved_step = training.Progress(), None
        if resume is not None:
            self.progress = training.load(resume, self.model, self.optimizer, self.scheduler, cfg.model)
            self.hf_source, self.saved_step = hf_files_of(resume), self.progress.step
            log.info("resumed from %s at step %d", resume, self.progress.step)
        self.dataset = open_dataset(cfg.data, cfg.train.seed, cfg.model.vocab_size)
        self.dp_rank = ps.get_data_parallel_rank()
        # The one rank whose loss values are reported: last pipeline stage, first TP rank.
        self.reports_loss = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.is_rank0 = dist.get_rank() == 0
        self.metrics: MetricsLogger = (JsonlMetrics(self.run_dir, resume_step=self.progress.step)
                                       if self.is_rank0 else NullMetrics())

    def _resume_path(self) -> Path | None:
        resume, root = self.cfg.resume, Path(self.cfg.checkpoint.dir)
        if resume == "never":
            return None
        if resume == "auto":
            found = training.latest(root)
            if found is None:
                log.info("resume=auto: no checkpoint under %s, starting from step 0", root)
            return found
        return Path(resume)

    # ---- one step -----------------------------------------------------------------------
    def forward_backward(self) -> torch.Tensor:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.train
        batches = micro_batches(
            self.dataset, self.progress.consumed_samples, t.global_batch_size, t.micro_batch_size,
            self.dp_rank, self.layout.dp, t.seq_length,
        )
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        n_chunks = len(self.model)
        # Interleaved schedules take one iterator per model chunk, each over the same batches.
        data = [iter(batches) for _ in range(n_chunks)] if n_chunks > 1 else iter(batches)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data,
            model=self.model if n_chunks > 1 else self.model[0],
            num_microbatches=len(batches),
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        return self.global_loss(outputs).cpu()

    def global_loss(self, outputs: list[dict]) -> torch.Tensor:
        """[loss_sum, tokens] over the global batch, known to every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=_device())
        if self.reports_loss:
            for o in outputs:
                total += o["lm_loss"].double()
        dist.all_reduce(total)
        return total

    def optimizer_step(self) -> tuple[float, float]:
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("optimizer step skipped (non-finite gradients)")
        self.scheduler.step(increment=1)
        return float(grad_norm or 0.0), lr

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        loss_sum, tokens = self.forward_backward().tolist()
        grad_norm, lr = self.optimizer_step()
        self.progress.step += 1
        self.progress.consumed_samples += self.cfg.train.global_batch_size
        elapsed = time.perf_counter() - start
        return {
            "train/loss": loss_sum / max(tokens, 1.0),
            "train/grad_norm": grad_norm,
            "train/lr": lr,
            "train/tokens": tokens,
            "time/step": elapsed,
            "train/tokens_per_s": tokens / elapsed,
        }

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        steps, history = self.cfg.train.steps, []
        first, start = self.progress.step, time.perf_counter()
        while self.progress.step < steps:
            metrics = self.train_step()
            step = self.progress.step
            history.append(metrics)
            self.metrics.log_metrics(metrics, step)
            self.report(step, metrics, (time.perf_counter() - start) / (step - first))
            interval = self.cfg.checkpoint.interval
            if interval and step % interval == 0:
                self.save()
        self.finish()
        return history

    def report(self, step: int, m: dict[str, float], per_step: float) -> None:
        if step % self.cfg.train.log_interval and step != self.cfg.train.steps:
            return
        log.info(
            "step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s  eta %.0fs",
            step, self.cfg.train.steps, m["train/loss"], m["train/grad_norm"], m["train/lr"],
            m["train/tokens_per_s"], per_step * (self.cfg.train.steps - step),
        )

    def save(self) -> None:
        c = self.cfg.checkpoint
        path = training.save(Path(c.dir), self.progress, self.model, self.optimizer, self.scheduler,
                             self.cfg.model, c.keep_last, self.hf_source)
        self.saved_step = self.progress.step
        if self.hf_source is not None:  # the source may be an older checkpoint, soon pruned
            self.hf_source = path / "hf"

    def finish(self) -> None:
        if self.cfg.checkpoint.save_final and self.saved_step != self.progress.step:
            self.save()
        self.metrics.close()
