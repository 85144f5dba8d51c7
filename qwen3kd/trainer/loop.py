"""The training loop: the student learns from the co-located teacher (or alone, by cross-entropy).

Each phase of a step is a named method; the loop itself reads like the algorithm:
    for each step:  teacher onload → forward-backward over micro-batches (per micro-batch: teacher
                    forward, student forward, KD loss) → optimizer step → teacher offload
                    → metrics → evaluation → checkpoint
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qwen3kd.checkpoint import training
from qwen3kd.checkpoint.weights import hf_files_of, load_initial_weights
from qwen3kd.config.schema import JobConfig
from qwen3kd.data.batches import micro_batches
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.models.qwen3 import build_model
from qwen3kd.tracking.run import open_tracking
from qwen3kd.trainer.data import TrainData
from qwen3kd.trainer.evaluate import Evaluator
from qwen3kd.trainer.objectives import KDObjective, LMObjective, device
from qwen3kd.trainer.optim import build_optimizer, wrap_ddp

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: JobConfig, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        self.run_dir = Path(cfg.run.dir)

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        self.layout.init(cfg.train.seed)
        # Tokenizers, conformance and data first: a bad file fails before any model is built.
        self.data = TrainData.open(cfg)
        self.model = self.build_student()
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, self.layout)
        self.progress, self.saved_step = training.Progress(), None
        if self.resume_from is not None:
            self.progress = training.load(self.resume_from, self.model, self.optimizer,
                                          self.scheduler, cfg.model)
            self.hf_source, self.saved_step = hf_files_of(self.resume_from), self.progress.step
            log.info("resumed from %s at step %d", self.resume_from, self.progress.step)
        self.teacher = None
        if cfg.teacher is not None:
            from qwen3kd.teacher.frozen import Teacher

            self.teacher = Teacher(cfg, self.layout)
            self.objective = KDObjective(cfg, self.teacher, self.model, with_ce=False)
        else:
            self.objective = LMObjective()
        self.evaluator = Evaluator.create(cfg, self.data, self.teacher, self.model, self.layout)
        self.dp_rank = ps.get_data_parallel_rank()
        # The ranks whose loss values are reported: last pipeline stage, first TP rank.
        self.reports_loss = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.is_rank0 = dist.get_rank() == 0
        self.metrics = open_tracking(cfg, self.data, self.is_rank0, self.progress.step)
        dist.barrier()  # rank 0 opened MLflow: the others would count that wait in step 1's timings

    def build_student(self) -> list[torch.nn.Module]:
        from megatron.core.distributed import finalize_model_grads

        cfg = self.cfg
        chunks = build_model(cfg, self.layout)
        self.resume_from = self._resume_path()
        self.hf_source = None  # the student's Hugging Face files, carried into its checkpoints
        if self.resume_from is None and cfg.checkpoint.load:
            load_initial_weights(chunks, Path(cfg.checkpoint.load), cfg.model)
            self.hf_source = hf_files_of(Path(cfg.checkpoint.load))
            log.info("loaded weights from %s", cfg.checkpoint.load)
        model = wrap_ddp(chunks, cfg, self.layout)
        mcfg = chunks[0].config
        mcfg.finalize_model_grads_func = finalize_model_grads
        mcfg.no_sync_func = [m.no_sync for m in model]
        if len(model) == 1:
            mcfg.no_sync_func = mcfg.no_sync_func[0]
        return model

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
        t = self.cfg.train
        batches = micro_batches(self.data.train, self.progress.consumed_samples,
                                t.global_batch_size, t.micro_batch_size, self.dp_rank,
                                self.layout.dp, t.seq_length)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        return run_schedule(self.model, self.objective, batches, t, self.reports_loss,
                            forward_only=False)

    def optimizer_step(self) -> tuple[float, float]:
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("optimizer step skipped (non-finite gradients)")
        self.scheduler.step(increment=1)
        return float(grad_norm or 0.0), lr

    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        if self.teacher is not None:
            self.teacher.onload()
        total = self.forward_backward()
        timings = self.teacher.end_step() if self.teacher is not None else {}
        opt_start = time.perf_counter()
        grad_norm, lr = self.optimizer_step()
        if self.teacher is not None:
            self.teacher.offload()
        self.progress.step += 1
        self.progress.consumed_samples += self.cfg.train.global_batch_size
        end = time.perf_counter()
        metrics = self.objective.summarise(total, "train")
        metrics.update({"train/grad_norm": grad_norm, "train/lr": lr, "time/step": end - start,
                        "time/optimizer": end - opt_start,
                        "train/tokens_per_s": metrics["train/tokens"] / (end - start)})
        metrics.update(max_over_ranks(timings))
        return metrics

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        steps, history = self.cfg.train.steps, []
        first, start = self.progress.step, time.perf_counter()
        while self.progress.step < steps:
            metrics = self.train_step()
            step = self.progress.step
            if self.evaluator.due(step):
                metrics.update(self.evaluator.run(step, self.metrics))
            history.append(metrics)
            self.metrics.log_metrics(metrics, step)
            self.report(step, metrics, (time.perf_counter() - start) / (step - first))
            interval = self.cfg.checkpoint.interval
            if interval and step % interval == 0:
                self.save()
        self.finish()
        return history

    def report(self, step: int, m: dict[str, float], per_step: float) -> None:
        """The progress line on rank 0: step, loss, tokens/s, ETA."""
        steps = self.cfg.train.steps
        if step % self.cfg.train.log_interval and step != steps:
            return
        bar = "#" * round(20 * step / steps) + "." * (20 - round(20 * step / steps))
        extra = "".join(f"  {k.replace('train/', '').replace('/', '_')} {m[k]:.4f}"
                        for k in ("train/kl", "eval/kl") if k in m)
        log.info("[%s] step %d/%d  loss %.4f%s  grad_norm %.3f  lr %.2e  %.0f tok/s  eta %.0fs",
                 bar, step, steps, m["train/loss"], extra, m["train/grad_norm"], m["train/lr"],
                 m["train/tokens_per_s"], per_step * (steps - step))

    def save(self) -> None:
        """Student weights, optimizer, schedule, data position, RNG: never the teacher."""
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

    def fail(self) -> None:
        """The run is ending on an exception: the tracking run says so."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close(status="FAILED")


def run_schedule(model: list, objective, batches: list, t, reports: bool,
                 forward_only: bool) -> torch.Tensor:
    """Megatron's forward-backward schedule (pipelined when PP > 1) over `batches`; the report sums
    of the objective over the global batch, known to every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n_chunks = len(model)
    # Interleaved schedules take one iterator per model chunk, each over the same batches.
    data = [iter(batches) for _ in range(n_chunks)] if n_chunks > 1 else iter(batches)
    outputs = get_forward_backward_func()(
        forward_step_func=objective.forward_step,
        data_iterator=data,
        model=model if n_chunks > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=forward_only,
    )
    total = torch.zeros(objective.shape, dtype=torch.float64, device=device())
    if reports:
        for o in outputs:
            total += o["report"].to(total.device)
    dist.all_reduce(total)
    return total.cpu()


def max_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The slowest rank's value of each timing (the one the step waits for)."""
    if not values:
        return {}
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist(), strict=True))
