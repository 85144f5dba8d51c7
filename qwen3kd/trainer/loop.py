"""The training loop: the student learns from the co-located teacher (or alone, by cross-entropy).

Each part of a step is a named method; the loop itself reads like the algorithm:
    for each phase (off-policy, on-policy; config `phases`):
      for each step:  batch (off-policy: the teacher's answers; on-policy: the student's rollouts)
                      → per wave of micro-batches: the teacher's phase (its own layout: tokens
                      out, its forward, hidden states back) then the student's forward-backward
                      (KD loss) → gradients finalised over the waves → optimizer step
                      → (on-policy) weight sync into the rollout engine + staleness probe
                      → metrics → evaluation → checkpoint
      hand over: a checkpoint at the phase's last step
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qwen3kd.checkpoint import training
from qwen3kd.checkpoint.weights import hf_files_of, load_initial_weights
from qwen3kd.config.schema import JobConfig, OnPolicyObjective, Phase
from qwen3kd.data.batches import micro_batches
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.errors import ConfigError
from qwen3kd.models.qwen3 import build_model
from qwen3kd.tracking.run import open_tracking
from qwen3kd.trainer.data import TrainData
from qwen3kd.trainer.evaluate import Evaluator
from qwen3kd.trainer.ledger import Ledger
from qwen3kd.trainer.objectives import GRPOObjective, KDObjective, LMObjective, device
from qwen3kd.trainer.optim import build_optimizer, wrap_ddp
from qwen3kd.trainer.phases import onpolicy_kd, phase_plan, total_steps

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: JobConfig, layout: ParallelLayout):
        from qwen3kd.stop import StopSignal

        self.cfg, self.layout = cfg, layout
        self.run_dir = Path(cfg.run.dir)
        # First thing: a preemption warning during the (long) set-up must not kill the process.
        self.stop = StopSignal(cfg.train.exit_after_minutes)

    # ---- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        teacher_layout = None
        if cfg.teacher is not None:
            check_teacher_checkpoint(cfg.teacher)  # every rank, before any collective
            from qwen3kd.distributed.layout import teacher_layout as layout_of_teacher

            teacher_layout = layout_of_teacher(cfg, self.layout)  # checked by validate already
        teacher_groups = self.layout.init(cfg.train.seed, teacher=teacher_layout)
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

            self.teacher = Teacher(cfg, self.layout, teacher_layout, teacher_groups)
            self.objectives = {
                Phase.offpolicy: KDObjective(cfg, self.teacher, with_ce=False),
                Phase.onpolicy: GRPOObjective() if cfg.onpolicy.objective is OnPolicyObjective.grpo
                else KDObjective(cfg, self.teacher, with_ce=False, kd=onpolicy_kd(cfg)),
            }
        else:
            self.objectives = {Phase.offpolicy: LMObjective()}
        self.phase, self.rollouts = Phase.offpolicy, None
        self.evaluator = Evaluator.create(cfg, self.data, self.teacher, self.model, self.layout)
        self.dp_rank = ps.get_data_parallel_rank()
        # The ranks whose loss values are reported: last pipeline stage, first TP rank.
        self.reports_loss = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.is_rank0 = dist.get_rank() == 0
        self.ledger = Ledger(cfg, self.layout.dp, device())
        self.metrics = open_tracking(cfg, self.data, self.is_rank0, self.progress.step)
        dist.barrier()  # rank 0 opened MLflow: the others would count that wait in step 1's timings

    def build_student(self) -> list[torch.nn.Module]:
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
        # Gradients are finalised once per step, after all its waves (forward_backward), not by
        # each schedule call.
        mcfg.finalize_model_grads_func = None
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
    @property
    def objective(self):
        return self.objectives[self.phase]

    def next_batches(self) -> tuple[list, dict[str, float]]:
        """This rank's micro-batches of the next step, and metrics of how they were made."""
        if self.phase is Phase.onpolicy:
            return self.rollouts.batches(self.progress.step + 1)
        t = self.cfg.train
        return micro_batches(self.data.train, self.progress.consumed_samples, t.global_batch_size,
                             t.micro_batch_size, self.dp_rank, self.layout.dp, t.seq_length), {}

    def forward_backward(self, batches: list) -> torch.Tensor:
        """Gradients of the step's loss, summed over its waves (one wave unless teacher.wave_tokens
        cuts it), scaled by the global count of learned tokens once at the end."""
        from megatron.core.distributed import finalize_model_grads

        t = self.cfg.train
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = 0
        for wave in self.objective.waves(batches):
            with self.objective.scored(wave):
                total = total + run_schedule(self.model, self.objective, wave, t, self.reports_loss,
                                             forward_only=False)
        tokens = sum(int(mb.loss_mask.sum()) for mb in batches)  # this replica's; megatron sums them
        finalize_model_grads(self.model, torch.tensor(tokens, dtype=torch.int, device=device()))
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
        batches, made = self.next_batches()
        total = self.forward_backward(batches)
        timings = self.teacher.take_timings() if self.teacher is not None else {}
        opt_start = time.perf_counter()
        grad_norm, lr = self.optimizer_step()
        end = time.perf_counter()
        self.progress.step += 1
        if self.phase is Phase.offpolicy:
            self.progress.consumed_samples += self.cfg.train.global_batch_size
        elif self.rollouts.sync_due(self.progress.step):
            made.update(self.rollouts.sync())
        metrics = self.objective.summarise(total, "train")
        metrics.update({"train/grad_norm": grad_norm, "train/lr": lr, "time/step": end - start,
                        "time/optimizer": end - opt_start,
                        "train/tokens_per_s": metrics["train/tokens"] / (end - start)})
        metrics.update(max_over_ranks(timings))
        metrics.update(made)
        metrics.update(self.ledger.step(sum(mb.n_tokens for mb in batches),
                                        scored=isinstance(self.objective, KDObjective),
                                        generated_tokens=made.get("rollout/generated_tokens", 0.0)))
        return metrics

    # ---- the loop -----------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        history, plan = [], phase_plan(self.cfg)
        first, start = self.progress.step, time.perf_counter()
        for phase, begin, end in plan:
            if self.progress.step >= end:
                continue  # done before a resume
            self.begin_phase(phase, begin, end)
            while self.progress.step < end:
                metrics = self.checked_step()
                step = self.progress.step
                if self.evaluator.due(step):
                    metrics.update(self.evaluator.run(step, self.metrics))
                history.append(metrics)
                self.metrics.log_metrics(metrics, step)
                self.report(step, metrics, (time.perf_counter() - start) / (step - first))
                interval = self.cfg.checkpoint.interval
                if interval and step % interval == 0:
                    self.save()
                if self.stop.agreed():  # the loop boundary: every rank stops here, or none
                    self.stop_here()
            self.end_phase(last=end == plan[-1][2])
        self.finish()
        return history

    def checked_step(self) -> dict[str, float]:
        from qwen3kd.rollout.engine import RolloutEngineError

        try:
            return self.train_step()
        except RolloutEngineError as e:
            last = training.latest(Path(self.cfg.checkpoint.dir))
            raise RolloutEngineError(
                f"step {self.progress.step + 1}: {e}. The run stops; its last checkpoint "
                f"({last or 'none yet'}) is complete: resume=auto continues from it") from e

    def begin_phase(self, phase: Phase, begin: int, end: int) -> None:
        self.phase = phase
        log.info("phase %s: steps %d..%d", phase.value, self.progress.step + 1, end)
        if phase is Phase.onpolicy:
            from qwen3kd.trainer.onpolicy import OnPolicySource

            self.rollouts = OnPolicySource(self.cfg, self.layout, self.data.tokenizer, self.model, begin)
            # The engine starts without weights: the first sync brings the student's and probes them.
            self.metrics.log_metrics(self.rollouts.sync(), self.progress.step)

    def end_phase(self, last: bool) -> None:
        """Hand over to the next phase: a checkpoint of this phase's last step."""
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        if not last and self.saved_step != self.progress.step:
            self.save()

    def report(self, step: int, m: dict[str, float], per_step: float) -> None:
        """The progress line on rank 0: step, loss, tokens/s, ETA."""
        steps = total_steps(self.cfg)
        if step % self.cfg.train.log_interval and step != steps:
            return
        bar = "#" * round(20 * step / steps) + "." * (20 - round(20 * step / steps))
        extra = "".join(f"  {k.replace('train/', '').replace('/', '_')} {m[k]:.4f}"
                        for k in ("train/kl", "eval/kl", "rollout/probe_gap") if k in m)
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

    def stop_here(self) -> None:
        """Stop early on purpose (qwen3kd/stop.py): a complete checkpoint of this step, the
        rollout engine shut down, the MLflow run marked KILLED (a resume continues it)."""
        from qwen3kd.stop import StopRequested

        if self.saved_step != self.progress.step:
            self.save()
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        self.metrics.close(status="KILLED")
        why = self.stop.local() or "another rank asked"
        raise StopRequested(f"stopped at step {self.progress.step} ({why}); its checkpoint is "
                            f"complete: resume=auto continues from it")

    def finish(self) -> None:
        if self.cfg.checkpoint.save_final and self.saved_step != self.progress.step:
            self.save()
        self.metrics.close()

    def fail(self) -> None:
        """The run is ending on an exception: the engine goes, the tracking run says so."""
        if getattr(self, "rollouts", None) is not None:
            self.rollouts.close()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close(status="FAILED")


def check_teacher_checkpoint(t) -> None:
    """teacher.load is set and holds weights of teacher.model (metadata only): a ConfigError that
    names the file on every rank alike, so none is left waiting in a collective."""
    from qwen3kd.checkpoint.weights import check_fits
    from qwen3kd.errors import DataError

    if not t.load:
        raise ConfigError("teacher.load: the teacher's weights (a Hugging Face folder or a "
                          "Megatron checkpoint) are required")
    try:
        check_fits(Path(t.load), t.model)
    except DataError as e:
        raise ConfigError(f"teacher.load: {str(e).replace(' model.', ' teacher.model.')}") from None


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
