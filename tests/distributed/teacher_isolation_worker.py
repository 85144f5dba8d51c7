"""Under torchrun: set up a distillation trainer whose teacher has its own layout, run the teacher
phase of one step under the tracers (tracing.py), and write per rank which groups it talked on and
which megatron parallel_state functions it read."""

import json
import os
import sys

from inprocess import trainer_in_process
from tracing import trace_collectives, trace_parallel_state


def main(config: str, out: str, *overrides: str) -> None:
    trainer = trainer_in_process(config, list(overrides))
    teacher = trainer.teacher
    batches, _ = trainer.next_batches()
    mine = teacher.groups.all()
    student = {g for g in vars(trainer.layout.groups()).values() if g is not None}
    with trace_collectives() as calls, trace_parallel_state() as reads:
        teacher.score(batches)
    result = {
        "ops": sorted({op for op, _ in calls}),
        "foreign": [[op, "world" if g is None else sorted(dist_ranks(g)), g in student]
                    for op, g in calls if g not in mine],
        "teacher_groups_used": len({g for _, g in calls if g in mine}),
        "parallel_state": sorted(reads),
        "hidden": [list(mb.teacher_hidden.shape) for mb in batches if mb.teacher_hidden is not None],
    }
    trainer.layout.destroy()
    with open(f"{out}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(result, f)


def dist_ranks(group) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(group)


if __name__ == "__main__":
    main(*sys.argv[1:])
