"""The frozen teacher: a Megatron model in the trainer's own processes with a parallel layout of
its own (teacher.parallel), run once per step (or wave) before the student's forward-backward.

Why a phase of its own and not inside the student's schedule: in the student's 1F1B schedule
stage s runs another micro-batch than stage s + 1 at any moment, so teacher collectives over a
grid that crosses student stages would be issued in different orders on different ranks
(deadlock). The rank's micro-batches of a step are known before the schedule, so:
    teacher onload → token ids to the teacher's replicas (one all-to-all) → the teacher's own
    forward-only schedule → final hidden states back to the student ranks that own the tokens
    (one all-to-all) → teacher offload → output-layer copy onload → the student's
    forward-backward reads them → output-layer copy offload, hidden states released.

The teacher stops at its final hidden states ([S, B, H_t], after the final norm): its own output
layer is not kept. The student's last stage holds the teacher's output layer split by the
student's TP (teacher/head.py) and the fused KD loss makes teacher logits chunk by chunk from the
two. The payload is 59–74× smaller than one fp32 logits row per token at Qwen3's sizes.

Every collective of the teacher runs on its own groups (distributed/groups.py); megatron's global
parallel state stays the student's. The teacher is not a parameter of the trainer's model: no
gradients, no optimizer, no checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qwen3kd.checkpoint.weights import load_initial_weights
from qwen3kd.config.schema import JobConfig, Precision, TeacherPrecision
from qwen3kd.distributed.groups import Groups
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.models.qwen3 import build_model
from qwen3kd.teacher.exchange import Exchange
from qwen3kd.teacher.head import TeacherHead, load_head

log = logging.getLogger(__name__)


def teacher_dtype(cfg: JobConfig) -> torch.dtype:
    prec = cfg.teacher.precision
    if prec is TeacherPrecision.auto:
        prec = TeacherPrecision.bf16 if torch.cuda.is_available() else TeacherPrecision.fp32
    return torch.bfloat16 if prec is TeacherPrecision.bf16 else torch.float32


def teacher_job(cfg: JobConfig, layout: ParallelLayout) -> JobConfig:
    """The config the teacher is built from: its architecture, precision and layout."""
    bf16 = teacher_dtype(cfg) == torch.bfloat16
    job = OmegaConf.merge(cfg, {
        "model": cfg.teacher.model,
        "train": {"precision": Precision.bf16 if bf16 else Precision.fp32},
        "parallel": {"tensor": layout.tp, "pipeline": layout.pp, "expert": layout.ep,
                     "expert_tensor": layout.etp, "sequence_parallel": layout.sequence_parallel,
                     "virtual_pipeline": None, "first_stage_layers": None, "last_stage_layers": None},
    })
    OmegaConf.set_readonly(job, True)
    return job


def final_hidden_only(model: torch.nn.Module) -> None:
    """Make a GPTModel stop at its final norm: the last stage returns the hidden states [S, B, H]
    the output layer would read, and the output layer itself is dropped (its storage freed)."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if gpt.post_process:
        del gpt.output_layer
        # Nothing to tie any more (with one stage the embedding stays, as the input layer).
        gpt.share_embeddings_and_output_weights = False
        gpt.post_process = False  # the decoder keeps its final norm (built with the stage)


class Teacher:
    def __init__(self, cfg: JobConfig, student: ParallelLayout, layout: ParallelLayout,
                 groups: Groups):
        import torch.distributed as dist

        self.cfg, self.student, self.layout, self.groups = cfg.teacher, student, layout, groups
        self.job = teacher_job(cfg, layout)
        self.train = cfg.train
        (self.model,) = build_model(self.job, layout, pgc=groups.pgc, initialize=False)
        final_hidden_only(self.model)
        load_initial_weights([self.model], Path(self.cfg.load), self.job.model)
        self.model.eval()
        self.model.requires_grad_(False)
        log.info("teacher: loaded %s from %s", self.job.model.name, self.cfg.load)
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        self.p2p = P2PCommunicator(pp_group=groups.pgc.pp, config=self.model.config)
        self.dtype = self.model.config.params_dtype
        rank = dist.get_rank()
        self.head = None
        if student.coords(rank)["pp"] == student.pp - 1:  # the student's last stage
            weight = load_head(Path(self.cfg.load), self.job.model, student.coords(rank)["tp"],
                               student.tp, self.dtype)
            self.head = TeacherHead(weight, self.cfg.offload)
        self.timings = {"time/teacher_forward": 0.0, "time/teacher_exchange": 0.0,
                        "teacher/payload_mb": 0.0}

    def parameters(self):
        yield from self.model.parameters()

    def waves(self, batches: list) -> list[list]:
        """The step's micro-batches in waves of at most teacher.wave_tokens tokens per rank."""
        if self.cfg.wave_tokens is None:
            return [batches]
        per = max(1, self.cfg.wave_tokens // (self.train.micro_batch_size * self.train.seq_length))
        return [batches[i: i + per] for i in range(0, len(batches), per)]

    @contextlib.contextmanager
    def scoring(self, batches: list):
        """The memory choreography around one wave: the teacher's weights on the device only for
        its forward, the output-layer copy only for the student's forward-backward, the hidden
        states released when the wave is done (tests/unit/test_teacher_phase.py asserts it)."""
        self.onload()
        try:
            self.score(batches)
        finally:
            self.offload()
        if self.head is not None:
            self.head.onload()
        try:
            yield
        finally:
            if self.head is not None:
                self.head.offload()
            for mb in batches:
                mb.teacher_hidden = None

    @torch.no_grad()
    def score(self, batches: list) -> None:
        """The teacher phase: each micro-batch of the student's last stage gets `teacher_hidden`,
        the teacher's final hidden states of its tokens [S(/TP), B, H_t]."""
        start = time.perf_counter()
        ex = self._exchange(len(batches))
        from qwen3kd.trainer.objectives import device

        local = [torch.stack([mb.tokens, mb.position_ids, _segments(mb)]).to(device())
                 for mb in batches]
        inputs = ex.send_tokens(local, self.groups.exchange)
        mid = time.perf_counter()
        outputs = self._forward(inputs)
        end = time.perf_counter()
        hidden = ex.return_hidden(outputs, self.job.model.hidden_size, self.dtype,
                                  local[0].device, self.groups.exchange)
        del outputs
        if hidden is not None:
            for mb, h in zip(batches, hidden, strict=True):
                mb.teacher_hidden = h
            mb_bytes = sum(h.numel() * h.element_size() for h in hidden)
            self.timings["teacher/payload_mb"] = max(self.timings["teacher/payload_mb"], mb_bytes / 2**20)
        self.timings["time/teacher_forward"] += end - mid
        self.timings["time/teacher_exchange"] += (mid - start) + time.perf_counter() - end

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one Teacher per process)
    def _exchange(self, n: int) -> Exchange:
        """The routing of a wave of n micro-batches: a pure function of the layouts, built once
        per wave size, not at every step (its routes cover every rank of the job)."""
        t = self.train
        return Exchange(self.student, self.layout, n, t.seq_length, t.micro_batch_size)

    def _forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The teacher's forward-only schedule over its replica's micro-batches ([3, B, S] each);
        the final hidden states on its last stage, None on the others."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from qwen3kd.data.batches import packed_attention_mask
        from qwen3kd.trainer.objectives import device

        outputs = []
        zero, no_tokens = torch.zeros((), device=device()), torch.zeros((), dtype=torch.int, device=device())

        def keep(out):
            outputs.append(out)
            return zero, no_tokens, {}

        def step(data_iterator, model):
            tokens, pos, seg = next(data_iterator).to(device())
            return model(tokens, pos, packed_attention_mask(seg)), keep

        pgc = self.groups.pgc
        get_forward_backward_func(pp_size=self.layout.pp, vp_size=None)(
            forward_step_func=step, data_iterator=iter(inputs), model=[self.model],
            num_microbatches=len(inputs), seq_length=self.train.seq_length,
            micro_batch_size=self.train.micro_batch_size, forward_only=True,
            p2p_communicator=self.p2p, pg_collection=pgc,
        )
        return outputs if pgc.pp.rank() == pgc.pp.size() - 1 else None

    def take_timings(self) -> dict[str, float]:
        """This step's teacher timings and payload size (reset for the next step)."""
        out = dict(self.timings)
        self.timings = dict.fromkeys(out, 0.0)
        return out

    # ---- memory choreography (GPU): weights in host memory outside the teacher's phase ---------
    def onload(self) -> None:
        if self.cfg.offload and torch.cuda.is_available():
            self.model.to(torch.device("cuda", torch.cuda.current_device()))

    def offload(self) -> None:
        if self.cfg.offload and torch.cuda.is_available():
            self.model.to("cpu")
            torch.cuda.empty_cache()


def _segments(mb) -> torch.Tensor:
    """Packed-sample ids [B, S] (zeros when each row holds one sample)."""
    return mb.segments if mb.segments is not None else torch.zeros_like(mb.tokens)
