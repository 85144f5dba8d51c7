"""Moving a step between the student's layout and the teacher's: token ids to the teacher's
replicas, final hidden states back to the student ranks that own those tokens. One all-to-all
each way, on the teacher's exchange group.

Numbering. Student replica r (its data-parallel rank) holds micro-batches m = 0..n−1 of the step;
globally that is micro-batch g = r·n + m. Teacher replica t runs g in [t·per, (t+1)·per), per =
⌈dp_s·n / dp_t⌉, the last replica padded with empty micro-batches: every teacher replica runs the
same number, as its expert all-to-alls (across teacher replicas) need.

Who sends what is a pure function of the two layouts and (n, S, B), computed alike on every rank:
- tokens: each teacher rank needs all its replica's micro-batches (the first stage embeds them,
  every stage masks attention with them); micro-batch g comes from one rank of student replica
  g // n, chosen by the receiver's rank to spread the load;
- hidden states: the student's last-stage rank of TP rank s needs, per micro-batch, the sequence
  rows it computes the loss on ([s·S/TP, (s+1)·S/TP) with sequence parallelism, else all S); the
  teacher's last-stage ranks hold [u·S/TP_t, …) with the teacher's sequence parallelism (each sends
  its overlap), else all S (one of them sends, chosen by the receiver's rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from qwen3kd.distributed.layout import ParallelLayout


def replica(layout: ParallelLayout, dp_rank: int, last_stage_only: bool = False) -> list[int]:
    """The ranks of one data-parallel replica (megatron order: rank = tp + TP·(dp + DP·pp))."""
    stages = [layout.pp - 1] if last_stage_only else range(layout.pp)
    return [tp + layout.tp * (dp_rank + layout.dp * pp) for pp in stages for tp in range(layout.tp)]


def rows(layout: ParallelLayout, tp_rank: int, seq: int) -> tuple[int, int]:
    """The sequence rows a last-stage rank holds: its slice with sequence parallelism, else all."""
    if not layout.sequence_parallel:
        return 0, seq
    part = seq // layout.tp
    return tp_rank * part, (tp_rank + 1) * part


@dataclass(frozen=True)
class Exchange:
    student: ParallelLayout
    teacher: ParallelLayout
    n: int  # micro-batches per student replica in this wave
    seq: int
    micro_batch: int

    @property
    def total(self) -> int:
        return self.student.dp * self.n

    @property
    def per(self) -> int:
        """Micro-batches each teacher replica runs (padding included)."""
        return -(-self.total // self.teacher.dp)

    def teacher_batches(self, rank: int) -> list[int]:
        """Global micro-batch ids the teacher replica of `rank` runs, in order (≥ total: padding)."""
        t = self.teacher.coords(rank)["dp"]
        return list(range(t * self.per, (t + 1) * self.per))

    @cached_property
    def token_routes(self) -> list[tuple[int, int, int]]:
        """(source, destination, g) for every micro-batch's token ids, sorted."""
        out = []
        for dst in range(self.student.world_size):
            for g in self.teacher_batches(dst):
                if g < self.total:
                    senders = replica(self.student, g // self.n)
                    out.append((senders[dst % len(senders)], dst, g))
        return sorted(out)

    @cached_property
    def hidden_routes(self) -> list[tuple[int, int, int, int, int]]:
        """(source, destination, g, first row, end row) of every hidden-state piece, sorted."""
        out = []
        for dst_dp in range(self.student.dp):
            for dst in replica(self.student, dst_dp, last_stage_only=True):
                lo, hi = rows(self.student, self.student.coords(dst)["tp"], self.seq)
                for g in range(dst_dp * self.n, (dst_dp + 1) * self.n):
                    holders = replica(self.teacher, g // self.per, last_stage_only=True)
                    if not self.teacher.sequence_parallel:
                        holders = [holders[dst % len(holders)]]
                    for src in holders:
                        a, b = rows(self.teacher, self.teacher.coords(src)["tp"], self.seq)
                        if max(a, lo) < min(b, hi):
                            out.append((src, dst, g, max(a, lo), min(b, hi)))
        return sorted(out)

    # ---- the two all-to-alls -------------------------------------------------------------------
    def send_tokens(self, local: list[torch.Tensor], group) -> list[torch.Tensor]:
        """`local`: this student rank's micro-batches, each [3, B, S] int64 (tokens, positions,
        packed-sample ids). Returns the teacher replica's micro-batches, padding as zeros."""
        rank, size = dist.get_rank(), self.student.world_size
        shape = (3, self.micro_batch, self.seq)
        numel = 3 * self.micro_batch * self.seq
        r = self.student.coords(rank)["dp"]
        sends = [[] for _ in range(size)]
        recv_from = [[] for _ in range(size)]
        for src, dst, g in self.token_routes:
            if src == rank:
                sends[dst].append(local[g - r * self.n].reshape(-1))
            if dst == rank:
                recv_from[src].append(g)
        got = _all_to_all(sends, [len(x) * numel for x in recv_from], torch.int64, local[0].device,
                          group)
        mine = self.teacher_batches(rank)
        out = [torch.zeros(shape, dtype=torch.int64, device=local[0].device) for _ in mine]
        for src, ids in enumerate(recv_from):
            for k, g in enumerate(ids):
                out[g - mine[0]] = got[src][k * numel: (k + 1) * numel].view(shape)
        return out

    def return_hidden(self, outputs: list[torch.Tensor] | None, hidden: int, dtype, device,
                      group) -> list[torch.Tensor] | None:
        """`outputs`: on the teacher's last stage, its replica's final hidden states [S_t, B, H]
        per micro-batch (None elsewhere). Returns, on the student's last stage, the hidden states
        of this rank's micro-batches, each [S_s, B, H] (its sequence rows); None elsewhere."""
        rank, size = dist.get_rank(), self.student.world_size
        row = self.micro_batch * hidden
        sends = [[] for _ in range(size)]
        recv = [[] for _ in range(size)]
        for src, dst, g, lo, hi in self.hidden_routes:
            if src == rank:
                first, _ = rows(self.teacher, self.teacher.coords(rank)["tp"], self.seq)
                sends[dst].append(outputs[g % self.per][lo - first: hi - first].reshape(-1))
            if dst == rank:
                recv[src].append((g, lo, hi))
        got = _all_to_all(sends, [sum(hi - lo for _, lo, hi in x) * row for x in recv], dtype,
                          device, group)
        c = self.student.coords(rank)
        if c["pp"] != self.student.pp - 1:
            return None
        first, end = rows(self.student, c["tp"], self.seq)
        out = [torch.empty(end - first, self.micro_batch, hidden, dtype=dtype, device=device)
               for _ in range(self.n)]
        for src, pieces in enumerate(recv):
            at = 0
            for g, lo, hi in pieces:
                k = (hi - lo) * row
                out[g - c["dp"] * self.n][lo - first: hi - first] = got[src][at: at + k].view(
                    hi - lo, self.micro_batch, hidden)
                at += k
        return out


def _all_to_all(sends: list[list[torch.Tensor]], recv_sizes: list[int], dtype, device,
                group) -> list[torch.Tensor]:
    """One all_to_all_single over flat buffers; returns what came from each rank."""
    send_sizes = [sum(t.numel() for t in parts) for parts in sends]
    flat = [t.to(dtype) for parts in sends for t in parts]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    return list(recv.split(recv_sizes))
