"""What the teacher costs each rank, from the config alone (`qwen3kd train --dry-run`).

Per rank: the teacher's weights at its own layout (no output layer of its own), the copy of its
output layer on the student's last stage (split by the student's TP), the final hidden states a
student last-stage rank receives per wave, and those a teacher last-stage rank holds until its
schedule ends. Sizes are at the teacher's precision on a GPU (bf16 unless teacher.precision=fp32).
"""

from __future__ import annotations

from qwen3kd.config.schema import JobConfig, TeacherPrecision
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.models.params import rank_params

GIB = 2**30


def memory_rows(cfg: JobConfig, student: ParallelLayout, teacher: ParallelLayout) -> list[dict]:
    m, t = cfg.teacher.model, cfg.train
    nbytes = 4 if cfg.teacher.precision is TeacherPrecision.fp32 else 2
    n = t.global_batch_size // (t.micro_batch_size * student.dp)  # micro-batches per replica
    if cfg.teacher.wave_tokens is not None:
        n = min(n, max(1, cfg.teacher.wave_tokens // (t.micro_batch_size * t.seq_length)))
    per = -(-n * student.dp // teacher.dp)  # micro-batches per teacher replica and wave
    token = t.micro_batch_size * m.hidden_size * nbytes  # one sequence position of a micro-batch
    out = []
    for rank in range(student.world_size):
        s, c = student.coords(rank), teacher.coords(rank)
        s_last, t_last = s["pp"] == student.pp - 1, c["pp"] == teacher.pp - 1
        rows_s = t.seq_length // (student.tp if student.sequence_parallel else 1)
        rows_t = t.seq_length // (teacher.tp if teacher.sequence_parallel else 1)
        out.append({
            "rank": rank,
            "teacher_weights": rank_params(m, teacher, rank, output_layer=False) * nbytes,
            "head_copy": m.vocab_size // student.tp * m.hidden_size * nbytes if s_last else 0,
            "hidden_in": n * rows_s * token if s_last else 0,
            "hidden_held": per * rows_t * token if t_last else 0,
        })
    return out


def memory_table(cfg: JobConfig, student: ParallelLayout, teacher: ParallelLayout) -> str:
    rows = memory_rows(cfg, student, teacher)
    keys = ("teacher_weights", "head_copy", "hidden_in", "hidden_held")
    head = ("teacher memory per rank, GiB (weights at its layout; its output layer copied on the "
            "student's last stage, split by the student's TP; hidden states received per wave by "
            "the student's last stage; held by the teacher's last stage until its schedule ends):")
    lines = [head, "  rank   weights  head_copy  hidden_in  hidden_held   total"]
    for r in rows[:64]:
        total = sum(r[k] for k in keys)
        lines.append(f"  {r['rank']:>4}  " + "  ".join(f"{r[k] / GIB:>9.3f}" for k in keys)
                     + f"  {total / GIB:>7.3f}")
    if len(rows) > 64:
        lines.append(f"  … {len(rows) - 64} more ranks")
    peak = max(rows, key=lambda r: sum(r[k] for k in keys))
    lines.append(f"  largest: rank {peak['rank']}, {sum(peak[k] for k in keys) / GIB:.3f} GiB")
    return "\n".join(lines)
