"""The on-policy phase's batches: the student answers prompts in the rollout engine, the rows it
trains on are those exact token ids, and after optimizer steps its new weights go back into the
engine, checked by a staleness probe.

Placement: one engine per data-parallel replica, held by the replica's first rank (TP 0, PP 0),
which generates that replica's share of the global batch and broadcasts it to the replica's other
ranks. Order around a training step (asserted by tests/unit/test_onpolicy_parts.py), so that on a
GPU the engine and the trainer never hold their working memory at once:
    engine.wake_up(kv_cache) → generate → probe of the old weights → engine.sleep
    → [teacher onload → forward/backward → optimizer step → teacher offload]   (the trainer)
    → engine.wake_up(weights) → load_weights → wake_up(kv_cache) → probe → engine.sleep
Probe: the log-probs of fixed sequences (the first prompts, think mode) from the engine after the
push must match the trainer's own within rollout.probe_tolerance, else the run stops: a stale or
wrongly loaded engine would silently train the student on another policy's samples.

Groups: each prompt is answered onpolicy.group_size times (same mode, a seed per answer), its
answers on one replica. Prompts, modes and seeds are functions of (config, step, index) only, so
two runs of the same settings — a distillation arm and a GRPO arm — answer the same prompts with
the same random numbers. When every prompt has an "answer", the replica's first rank grades each
rollout (onpolicy.verifier); GRPO turns a group's rewards into advantages there, before the
rollouts are broadcast.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qwen3kd.config.schema import JobConfig, Mode, OnPolicyObjective
from qwen3kd.data.batches import Row, collate, empty_row, pack_rows
from qwen3kd.data.chat import MODES
from qwen3kd.errors import DataError
from qwen3kd.faults import armed
from qwen3kd.rollout.engine import Request, Rollout, RolloutEngineError
from qwen3kd.rollout.prompts import Prompt, load_prompts, prompt_mode, render_prompt

log = logging.getLogger(__name__)

STATS = ("answers", "response_tokens", "truncated", "compliant", "budget_cut", "reward", "groups",
         "flat_groups")


def compliant(r: Rollout, think: tuple[int, int], empty_block: list[int]) -> bool:
    """think: the answer opens and closes its thinking; no_think: the prompt ends with the empty
    think block and the answer has no thinking of its own."""
    open_id, close_id = think
    ids = r.response_ids
    if r.mode is Mode.think:
        return bool(ids) and ids[0] == open_id and close_id in ids
    return r.prompt_ids[-len(empty_block):] == empty_block and open_id not in ids and close_id not in ids


def rollout_row(r: Rollout, seq: int) -> Row:
    ids = np.asarray(r.prompt_ids + r.response_ids, dtype=np.int64)[: seq + 1]
    mask = np.zeros(len(ids), dtype=np.float32)
    p = len(r.prompt_ids)
    # Label t is token t + 1: response token j is learned at position p − 1 + j (sampled ones only).
    sampled = np.asarray(r.sampled, dtype=np.float32)[: len(ids) - p]
    mask[p - 1: p - 1 + len(sampled)] = sampled
    modes = np.full(len(ids), MODES.index(r.mode), dtype=np.int64)
    adv = mask[:-1] * np.float32(r.meta["advantage"]) if "advantage" in r.meta else None
    return Row(ids=ids, mask=mask[:-1], modes=modes[:-1], advantages=adv)


class OnPolicySource:
    def __init__(self, cfg: JobConfig, layout, tokenizer, model: list, first_step: int,
                 engine_factory=None):
        from megatron.core import parallel_state as ps

        self.cfg, self.tok, self.model, self.first_step = cfg, tokenizer, model, first_step
        self.dp, self.dp_rank = layout.dp, ps.get_data_parallel_rank()
        self.group = ps.get_model_parallel_group()
        self.first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
        if self.first != (dist.get_rank(self.group) == 0):
            raise RuntimeError("the replica's first rank (TP 0, PP 0) is not rank 0 of its model-parallel group")
        r = cfg.rollout
        from qwen3kd.rollout.vllm_engine import engine_dtype, stop_thinking_ids

        stop_thinking_ids(tokenizer, r)  # checked on every rank, before the engine starts
        self.prompts = self._prompts()
        o = cfg.onpolicy
        self.grpo = o.objective is OnPolicyObjective.grpo
        unanswered = [p.line for p in self.prompts if p.answer is None]
        if self.grpo and unanswered:
            raise DataError(f"{o.prompts}:{unanswered[0]}: onpolicy.objective=grpo needs an "
                            f"'answer' on every prompt line (the verifier's reference)")
        self.rewarded = not unanswered
        from qwen3kd.rollout.verifiers import VERIFIERS, Grader

        self.verifier, self.grader = VERIFIERS[o.verifier], Grader.of(tokenizer)
        self.order = np.random.default_rng(cfg.train.seed).permutation(len(self.prompts))
        self.probe = [render_prompt(tokenizer, self.prompts[i].messages, Mode.think)
                      for i in range(min(r.probe_prompts, len(self.prompts)))]
        self.think, self.empty_block = self.grader.think, self.grader.empty_block
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.engine, self.stale_lp = None, None
        if self.first:
            self.engine = (engine_factory or self._start_engine)()
        self.tolerance = r.probe_tolerance if r.probe_tolerance is not None else (
            1e-3 if engine_dtype(r) == torch.float32 else 5e-2)

    def _prompts(self) -> list:
        c = self.cfg
        prompts = load_prompts(c.onpolicy.prompts)
        room = c.train.seq_length + 1 - c.rollout.max_new_tokens
        # no_think renders the longer prompt (the empty think block): it must leave room for the answer.
        kept = [p for p in prompts if len(render_prompt(self.tok, p.messages, Mode.no_think)) <= room]
        if len(kept) < len(prompts):
            log.warning("%s: %d of %d prompts dropped: prompt + rollout.max_new_tokens exceeds "
                        "train.seq_length + 1", c.onpolicy.prompts, len(prompts) - len(kept), len(prompts))
        if not kept:
            raise DataError(f"{c.onpolicy.prompts}: no prompt leaves room for rollout.max_new_tokens="
                            f"{c.rollout.max_new_tokens} within train.seq_length={c.train.seq_length}")
        return kept

    def _start_engine(self):
        """vLLM on a config-only Hugging Face folder with dummy weights: the first sync brings the
        student's, so the engine never starts from anything but the trainer's weights."""
        from qwen3kd.checkpoint.convert import write_hf_config
        from qwen3kd.rollout.vllm_engine import VllmEngine, engine_dtype

        c = self.cfg
        folder = Path(c.run.dir) / "rollout_model"
        folder.mkdir(parents=True, exist_ok=True)
        write_hf_config(folder, None, c.model, engine_dtype(c.rollout))
        return VllmEngine(folder, self.tok, c.rollout, c.train.seq_length + 1, c.data.end_of_turn,
                          dummy_weights=True)

    # ---- rollouts -----------------------------------------------------------------------
    def requests(self, step: int) -> list[tuple[Prompt, Request]]:
        """This replica's (prompt, request) pairs for `step` (1-based): its slice of the global
        batch, group_size consecutive answers per prompt."""
        c, size = self.cfg, self.cfg.onpolicy.group_size
        batch = c.onpolicy.batch_size or c.train.global_batch_size
        per = batch // self.dp
        base = (step - 1 - self.first_step) * batch + self.dp_rank * per
        out = []
        for g in range(base, base + per):
            q = g // size  # the prompt's index in the run's stream of prompts
            p = self.prompts[int(self.order[q % len(self.order)])]
            mode = prompt_mode(p, q, c.onpolicy.think_ratio, c.rollout.seed)
            seed = int(np.random.default_rng([c.rollout.seed, step, g]).integers(2**31))
            out.append((p, Request(render_prompt(self.tok, p.messages, mode), mode, seed)))
        return out

    def grade(self, asked: list[Prompt], rollouts: list[Rollout]) -> None:
        """Each rollout's reward (meta["reward"]) and, for GRPO, its group's advantage."""
        from qwen3kd.losses.policy_gradient import group_advantages

        for p, r in zip(asked, rollouts, strict=True):
            r.meta["reward"] = self.verifier(self.grader, p, r)
        if self.grpo:
            size = self.cfg.onpolicy.group_size
            rewards = torch.tensor([r.meta["reward"] for r in rollouts]).reshape(-1, size)
            adv = group_advantages(rewards, self.cfg.onpolicy.grpo_eps).reshape(-1)
            for r, a in zip(rollouts, adv.tolist(), strict=True):
                r.meta["advantage"] = a

    def batches(self, step: int) -> tuple[list, dict[str, float]]:
        """Micro-batches of this replica's rollouts for `step`, and the rollout metrics."""
        start = time.perf_counter()
        rollouts = [None]
        if self.first:
            if armed("engine_dead", step):  # the crash drill of the tests (qwen3kd/faults.py)
                log.warning("QWEN3KD_FAULT: killing the rollout engine's processes at step %d", step)
                self.engine.kill()
            self.engine.wake_up(("kv_cache",))
            asked, requests = zip(*self.requests(step), strict=True)
            rollouts = [self.engine.generate(list(requests))]
            if self.rewarded:
                self.grade(list(asked), rollouts[0])
            self.stale_lp = self.engine.prompt_logprobs(self.probe)  # the weights the step learns from
            self.engine.sleep(keep_weights=not self.sync_due(step))
        dist.broadcast_object_list(rollouts, group=self.group, group_src=0)
        rollouts = rollouts[0]
        mbs = self.micro_batches(rollouts)
        metrics = self._metrics(rollouts)
        metrics["time/rollout"] = time.perf_counter() - start
        return mbs, metrics

    def micro_batches(self, rollouts: list[Rollout]) -> list:
        """One row per rollout, packed (data.pack) into as few rows as fit: a rollout is usually
        much shorter than train.seq_length. Every data-parallel rank gets as many micro-batches
        as the one with most (filled with rows that learn nothing), so that all take the same
        number of schedule steps."""
        from megatron.core import parallel_state as ps

        from qwen3kd.trainer.objectives import device

        t, pack = self.cfg.train, self.cfg.data.pack
        rows = [rollout_row(r, t.seq_length) for r in rollouts]
        if pack:
            rows = pack_rows(rows, t.seq_length)
        n = torch.tensor([-(-len(rows) // t.micro_batch_size)], device=device())
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        rows += [empty_row(self.pad)] * (int(n) * t.micro_batch_size - len(rows))
        return [collate(rows[i: i + t.micro_batch_size], t.seq_length)
                for i in range(0, len(rows), t.micro_batch_size)]

    def _metrics(self, rollouts: list[Rollout]) -> dict[str, float]:
        sums = torch.zeros(len(MODES), len(STATS), dtype=torch.float64)
        for r in rollouts:
            sums[MODES.index(r.mode), :STATS.index("groups")] += torch.tensor([
                1, len(r.response_ids), r.finish_reason == "length",
                compliant(r, self.think, self.empty_block), r.budget_cut, r.meta.get("reward", 0.0)],
                dtype=torch.float64)
        size = self.cfg.onpolicy.group_size
        if self.rewarded and size > 1:  # groups whose answers all earned the same: no signal
            for k in range(0, len(rollouts), size):
                group = rollouts[k: k + size]
                flat = len({r.meta["reward"] for r in group}) == 1
                sums[MODES.index(group[0].mode), STATS.index("groups"):] += torch.tensor(
                    [1, flat], dtype=torch.float64)
        from megatron.core import parallel_state as ps

        from qwen3kd.trainer.objectives import device

        sums = sums.to(device())
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        sums = sums.cpu()
        out = {"rollout/response_length": float(sums[:, 1].sum() / sums[:, 0].sum()),
               "rollout/generated_tokens": float(sums[:, 1].sum())}
        for i, mode in enumerate(MODES):
            n = float(sums[i, 0])
            if n:
                m = mode.value
                out[f"rollout/answers/{m}"] = n
                out[f"rollout/response_length/{m}"] = float(sums[i, 1]) / n
                out[f"rollout/truncation_rate/{m}"] = float(sums[i, 2]) / n
                out[f"rollout/mode_compliance/{m}"] = float(sums[i, 3]) / n
                if self.rewarded:
                    out[f"rollout/reward/{m}"] = float(sums[i, 5]) / n
                if sums[i, 6] > 0:
                    out[f"rollout/zero_variance_groups/{m}"] = float(sums[i, 7] / sums[i, 6])
                if mode is Mode.think:
                    out["rollout/budget_cut_rate/think"] = float(sums[i, 4]) / n
        return out

    # ---- weight sync --------------------------------------------------------------------
    def sync_due(self, step: int) -> bool:
        return (step - self.first_step) % self.cfg.rollout.sync_interval == 0

    def sync(self) -> dict[str, float]:
        """Push the student's weights into the engine; compare log-probs on the probe."""
        from qwen3kd.rollout.weight_sync import hf_weights

        start = time.perf_counter()
        weights = hf_weights(self.model, self.cfg.model)
        if self.first:
            self.engine.wake_up(("weights",))
            self.engine.load_weights(weights)
            self.engine.wake_up(("kv_cache",))
            engine_lp = self.engine.prompt_logprobs(self.probe)
            self.engine.sleep(keep_weights=True)
        else:
            for _ in weights:  # drive this rank's share of the gather
                pass
        # The engine holder's time: the others' clocks include waiting for it (e.g. to start vLLM).
        elapsed = time.perf_counter() - start if self.first else 0.0
        trainer_lp = self.trainer_logprobs()
        gap = shift = 0.0
        if self.first:
            gap = max_abs_diff(engine_lp, trainer_lp)
            shift = max_abs_diff(self.stale_lp, trainer_lp) if self.stale_lp is not None else 0.0
        from qwen3kd.trainer.loop import max_over_ranks

        m = max_over_ranks({"rollout/probe_gap": gap, "rollout/policy_shift": shift,
                            "time/weight_sync": elapsed})
        if m["rollout/probe_gap"] > self.tolerance:
            raise RolloutEngineError(
                f"staleness probe: the rollout engine's log-probs differ from the trainer's by up "
                f"to {m['rollout/probe_gap']:.3g} (rollout.probe_tolerance={self.tolerance:g}) "
                f"after the weight sync: the engine does not run the student's weights")
        return m

    def trainer_logprobs(self) -> list[list[float]]:
        """log p(token t | < t) of the probe under the trainer's student (all ranks; forward only)."""
        from qwen3kd.trainer.loop import run_schedule

        t = self.cfg.train
        rows = [Row(ids=np.asarray(p, dtype=np.int64), mask=np.ones(len(p) - 1, dtype=np.float32))
                for p in self.probe]
        rows += rows[:1] * (-len(rows) % t.micro_batch_size)  # whole micro-batches
        mbs = [collate(rows[i: i + t.micro_batch_size], t.seq_length)
               for i in range(0, len(rows), t.micro_batch_size)]
        objective = _LogProbs(len(rows), t.seq_length, t.micro_batch_size)
        from megatron.core import parallel_state as ps

        reports = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        with torch.no_grad():
            total = run_schedule(self.model, objective, mbs, t, reports, forward_only=True)
        total /= self.dp  # every replica scored the same probe
        return [total[i, : len(p) - 1].tolist() for i, p in enumerate(self.probe)]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


class _LogProbs:
    """Forward-only objective: each probe row's per-token log-probs, in its own report slot."""

    def __init__(self, rows: int, seq: int, mbs: int):
        self.shape, self.mbs, self.seen = (rows, seq), mbs, 0

    def forward_step(self, data_iterator, model):
        from functools import partial

        from qwen3kd.trainer.objectives import _to_device

        tokens, pos, labels, mask, attn = _to_device(next(data_iterator))
        first, self.seen = self.seen, self.seen + self.mbs
        return model(tokens, pos, attn, labels=labels), partial(self.loss, first, mask)

    def loss(self, first: int, mask: torch.Tensor, per_token_ce: torch.Tensor):
        report = torch.zeros(self.shape, dtype=torch.float64)
        report[first: first + per_token_ce.shape[0]] = (-per_token_ce.double() * mask.double()).cpu()
        zero = per_token_ce.sum() * 0.0
        return zero, mask.sum().to(torch.int), {"report": report}
