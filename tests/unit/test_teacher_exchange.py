"""The routing of the teacher's two all-to-alls (teacher/exchange.py), for many pairs of layouts
over 8 ranks, without processes: every teacher rank gets each micro-batch of its replica once, from
a rank that holds it; every student last-stage rank gets exactly its sequence rows of each of its
micro-batches, each piece from a teacher last-stage rank that holds those rows."""

from __future__ import annotations

import itertools

import pytest

from qwen3kd.config.schema import ModelConfig, ParallelConfig
from qwen3kd.distributed.layout import ParallelLayout
from qwen3kd.teacher.exchange import Exchange, replica, rows

MODEL = ModelConfig(name="x", num_hidden_layers=4, hidden_size=64, intermediate_size=64,
                    num_attention_heads=8, num_key_value_heads=8, vocab_size=64)
# (tensor, pipeline, sequence parallel) over 8 ranks
SHAPES = [(1, 1, False), (2, 1, False), (2, 1, True), (4, 2, True), (1, 4, False), (8, 1, True),
          (2, 2, False)]


def layout(tp: int, pp: int, sp: bool) -> ParallelLayout:
    return ParallelLayout.from_config(
        ParallelConfig(tensor=tp, pipeline=pp, sequence_parallel=sp), MODEL, world_size=8)


@pytest.mark.parametrize("student,teacher", list(itertools.product(SHAPES, SHAPES)))
@pytest.mark.parametrize("n", [1, 3])
def test_routes_cover_every_micro_batch_and_row_once(student, teacher, n):
    s, t = layout(*student), layout(*teacher)
    ex = Exchange(s, t, n=n, seq=16, micro_batch=2)
    assert ex.per * t.dp >= ex.total > (ex.per - 1) * t.dp
    for dst in range(8):
        got = sorted(g for _, d, g in ex.token_routes if d == dst)
        assert got == [g for g in ex.teacher_batches(dst) if g < ex.total]
    for src, _, g in ex.token_routes:
        assert src in replica(s, g // n)  # the sender holds micro-batch g
    for d in range(s.dp):
        for dst in replica(s, d, last_stage_only=True):
            lo, hi = rows(s, s.coords(dst)["tp"], 16)
            for g in range(d * n, (d + 1) * n):
                pieces = sorted((a, b, src) for src, x, gg, a, b in ex.hidden_routes
                                if x == dst and gg == g)
                assert [p[0] for p in pieces][0] == lo and pieces[-1][1] == hi
                assert all(p[1] == q[0] for p, q in itertools.pairwise(pieces))  # tiled, no overlap
                for a, b, src in pieces:
                    assert src in replica(t, g // ex.per, last_stage_only=True)
                    first, end = rows(t, t.coords(src)["tp"], 16)
                    assert first <= a < b <= end
    receivers = {x for _, x, *_ in ex.hidden_routes}
    assert receivers == {r for d in range(s.dp) for r in replica(s, d, last_stage_only=True)}
