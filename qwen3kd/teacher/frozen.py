"""The frozen teacher: a Megatron model with the student's tensor and pipeline layout, run under
no-grad for one micro-batch right before the student uses it.

Why per micro-batch: one fp32 logits row is 0.6 MB per token (Qwen3's 151,936 columns), so the
teacher logits of a global batch do not fit anywhere. The teacher stops at its final hidden states
([S, B, H_t], after the final norm); the KD loss multiplies them by the teacher's output-layer
shard chunk by chunk (losses/fused.py), so teacher logits never exist in full either.

Pipeline parallelism: pipeline stage s holds the teacher's stage-s layers. The student's schedule
calls forward_step for micro-batch m on stage s only after stage s − 1 has run it, so each stage
runs its teacher part inside that call and sends the teacher's activation on to the next stage
over a process group of its own (its point-to-point traffic never interleaves with the schedule's);
the receiving stage finds it waiting. Interleaved schedules visit (chunk, micro-batch) pairs in
the same order on every stage, so the same holds per model chunk.

The teacher is not a parameter of the trainer's model: it has no gradients, is in no optimizer
and in no checkpoint (only `Trainer.model` is saved).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from qwen3kd.checkpoint.weights import load_initial_weights
from qwen3kd.config.schema import JobConfig, Precision, TeacherPrecision
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.models.qwen3 import build_model

log = logging.getLogger(__name__)


def teacher_job(cfg: JobConfig) -> JobConfig:
    """The config the teacher is built from: the student's layout, the teacher's architecture and
    precision, its layers split evenly over the pipeline stages."""
    t = cfg.teacher
    prec = t.precision
    if prec is TeacherPrecision.auto:
        prec = TeacherPrecision.bf16 if torch.cuda.is_available() else TeacherPrecision.fp32
    job = OmegaConf.merge(cfg, {
        "model": t.model,
        "train": {"precision": Precision.bf16 if prec is TeacherPrecision.bf16 else Precision.fp32},
        "parallel": {"first_stage_layers": None, "last_stage_layers": None},
    })
    OmegaConf.set_readonly(job, True)
    return job


@contextlib.contextmanager
def final_hidden(model: torch.nn.Module):
    """Run a GPTModel (possibly wrapped) up to its final norm: on the last pipeline stage it
    returns the hidden states [S, B, H] the output layer would read, not the logits."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if not gpt.post_process:
        yield
        return
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = True


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output layer's weight shard [V/TP, H] (the embedding when they are tied)."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


class _StageLink:
    """Point-to-point between neighbouring pipeline stages, on process groups of its own."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        mine = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        self.group = None
        for ranks in sorted({tuple(r) for r in every}):  # every rank creates every group, in order
            g = dist.new_group(list(ranks))
            if list(ranks) == mine:
                self.group = g
        i = mine.index(dist.get_rank())
        self.next, self.prev = mine[(i + 1) % len(mine)], mine[i - 1]
        self.pending: list = []

    def send(self, t: torch.Tensor) -> None:
        self.wait()  # at most one activation in flight: it is freed before the next is made
        self.pending = [(dist.isend(t.contiguous(), self.next, group=self.group), t)]

    def recv(self, shape, dtype, device) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, self.prev, group=self.group)
        return out

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


class Teacher:
    def __init__(self, cfg: JobConfig, layout: ParallelLayout):
        self.cfg, self.job = cfg.teacher, teacher_job(cfg)
        self.chunks = build_model(self.job, layout)
        if self.cfg.load:
            load_initial_weights(self.chunks, Path(self.cfg.load), self.job.model)
            log.info("teacher: loaded %s from %s", self.job.model.name, self.cfg.load)
        else:
            log.warning("teacher: no teacher.load, random weights (tests only)")
        for c in self.chunks:
            c.eval()
            c.requires_grad_(False)
        self.link = _StageLink() if layout.pp > 1 else None
        self.dtype = self.chunks[0].config.params_dtype
        self.sequence_parallel = layout.sequence_parallel
        self.tp = layout.tp
        self.live = 0  # final hidden states handed out and still alive
        self.max_live = 0
        self.forward_time = 0.0

    def parameters(self):
        for c in self.chunks:
            yield from c.parameters()

    def output_weight(self) -> torch.Tensor:
        return output_weight(self.chunks[-1])

    @torch.no_grad()
    def forward(self, chunk: int, tokens, position_ids, attention_mask) -> torch.Tensor | None:
        """Run this rank's teacher chunk on one micro-batch: the final hidden states [S(/TP), B,
        H_t] on the last pipeline stage, None on the others (their output goes to the next one)."""
        from megatron.core.utils import unwrap_model

        start = time.perf_counter()
        gpt = unwrap_model(self.chunks[chunk])
        if not gpt.pre_process:
            b, s = tokens.shape
            s = s // self.tp if self.sequence_parallel else s
            gpt.set_input_tensor(self.link.recv((s, b, gpt.config.hidden_size), self.dtype,
                                                tokens.device))
        with final_hidden(gpt):
            out = gpt(tokens, position_ids, attention_mask)
        self.forward_time += time.perf_counter() - start
        if not gpt.post_process:
            self.link.send(out)
            return None
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        weakref.finalize(out, self._freed)
        return out

    def _freed(self) -> None:
        self.live -= 1

    def end_step(self) -> dict[str, float]:
        """After a step's last micro-batch: finish sends; this step's teacher timings."""
        if self.link is not None:
            self.link.wait()
        out = {"time/teacher_forward": self.forward_time, "teacher/max_live_outputs": self.max_live}
        self.forward_time, self.max_live = 0.0, 0
        return out

    # ---- memory choreography (GPU): weights in CPU memory between steps ----------------------
    def onload(self) -> None:
        if self.cfg.offload and torch.cuda.is_available():
            for c in self.chunks:
                c.to(torch.device("cuda", torch.cuda.current_device()))

    def offload(self) -> None:
        if self.cfg.offload and torch.cuda.is_available():
            for c in self.chunks:
                c.to("cpu")
            torch.cuda.empty_cache()
