"""Periodic evaluation on held-out conversations: KL and CE per mode, and a few samples.

The first `eval.samples` rows of data.eval_path are split over the data-parallel ranks like a
training batch and run forward-only through the same schedule and KD loss. The first
`eval.log_samples` samples get metric groups of their own (group = mode + 2 · slot), so their
per-sample KL and CE come out of the same pass; they are written with their text as an artifact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from qwen3kd.config.schema import JobConfig
from qwen3kd.data.batches import collate
from qwen3kd.data.chat import MODES
from qwen3kd.files import write_text_atomic
from qwen3kd.trainer.phases import total_steps

log = logging.getLogger(__name__)


class Evaluator:
    @classmethod
    def create(cls, cfg: JobConfig, data, teacher, model, layout):
        # validate.py checked the eval keys against the teacher, the data and the layout.
        return cls(cfg, data, teacher, model, layout) if cfg.eval.interval else _Never()

    def __init__(self, cfg: JobConfig, data, teacher, model, layout):
        from megatron.core import parallel_state as ps

        from qwen3kd.trainer.objectives import KDObjective

        self.cfg, self.data, self.model = cfg, data, model
        self.k = cfg.eval.log_samples
        self.objective = KDObjective(cfg, teacher, with_ce=True,
                                     n_groups=len(MODES) * (self.k + 1))
        self.rows = min(cfg.eval.samples, len(data.eval))
        self.reports = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.logged = self._logged_samples()
        self.batches = self._batches(ps.get_data_parallel_rank(), layout.dp)  # the same each time

    def due(self, step: int) -> bool:
        return step % self.cfg.eval.interval == 0 or step == total_steps(self.cfg)

    def _logged_samples(self) -> dict[tuple[int, int], int]:
        """(row, segment) → slot, for the first k samples in row order."""
        slots = {}
        for r in range(self.rows):
            for s in range(len(self.data.eval.row_samples(r))):
                if len(slots) < self.k:
                    slots[(r, s)] = len(slots)
        return slots

    def _batches(self, dp_rank: int, dp: int):
        t = self.cfg.train
        per_rank = self.rows // dp
        first = dp_rank * per_rank
        out = []
        for m in range(per_rank // t.micro_batch_size):
            idx = [first + m * t.micro_batch_size + j for j in range(t.micro_batch_size)]
            mb = collate([self.data.eval.row(i, t.seq_length) for i in idx], t.seq_length)
            seg = mb.segments if mb.segments is not None else torch.zeros_like(mb.modes)
            slot = torch.full_like(mb.modes, self.k)
            for j, r in enumerate(idx):
                for s in range(len(self.data.eval.row_samples(r))):
                    if (r, s) in self.logged:
                        slot[j][seg[j] == s] = self.logged[(r, s)]
            mb.groups = mb.modes + len(MODES) * slot
            out.append(mb)
        return out

    @torch.no_grad()
    def run(self, step: int, metrics_logger) -> dict[str, float]:
        from qwen3kd.trainer.loop import run_schedule

        total = 0
        for wave in self.objective.waves(self.batches):
            with self.objective.scored(wave):
                total = total + run_schedule(self.model, self.objective, wave, self.cfg.train,
                                             self.reports, forward_only=True)
        self.objective.teacher.take_timings()  # the training step's timings are not the eval's
        out = self.objective.summarise(total, "eval")
        if dist.get_rank() == 0:
            metrics_logger.log_artifact(self._write_samples(step, total), "eval")
        return out

    def _write_samples(self, step: int, total: torch.Tensor) -> Path:
        from qwen3kd.losses.fused import METRICS

        tok = self.data.tokenizer
        per_slot = total.reshape(self.k + 1, len(MODES), -1).sum(1)
        records = []
        for (r, s), k in self.logged.items():
            sample = self.data.eval.row_samples(r)[s]
            n = float(per_slot[k, -1])
            records.append({
                "line": sample.line, "turn": sample.turn, "mode": MODES[sample.mode].value,
                "prompt": tok.decode(sample.ids[: sample.prompt_len].tolist()),
                "answer": tok.decode(sample.ids[sample.prompt_len:].tolist()),
                "answer_tokens": n,
                "kl": float(per_slot[k, METRICS.index("kl")]) / max(n, 1.0),
                "ce": float(per_slot[k, METRICS.index("ce")]) / max(n, 1.0),
            })
        out = Path(self.cfg.run.dir) / "eval" / f"samples_step_{step:07d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in records))


class _Never:
    def due(self, step: int) -> bool:
        return False

