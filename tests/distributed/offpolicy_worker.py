"""Under torchrun: train a few distillation steps in-process and check the teacher's isolation —
no gradient, not in the optimizer, unchanged weights, its hidden states released after each step."""

import json
import os
import sys

import torch
from inprocess import trainer_in_process


def main(config: str, out: str, *overrides: str) -> None:
    trainer = trainer_in_process(config, list(overrides))
    teacher = list(trainer.teacher.parameters())
    before = [p.detach().clone() for p in teacher]
    history = trainer.train()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    student = [p for m in trainer.model for p in m.parameters()]
    result = {
        "teacher_params": len(teacher),
        "teacher_requires_grad": sum(p.requires_grad for p in teacher),
        "teacher_grads": sum(p.grad is not None or getattr(p, "main_grad", None) is not None
                             for p in teacher),
        "teacher_in_optimizer": sum(id(p) in in_optimizer for p in teacher),
        "teacher_changed": sum(not torch.equal(a, b) for a, b in zip(before, teacher, strict=True)),
        "student_grads": sum(getattr(p, "main_grad", None) is not None for p in student),
        "student_params": len(student),
        "payload_mb": [h["teacher/payload_mb"] for h in history],
        "losses": [h["train/loss"] for h in history],
    }
    trainer.layout.destroy()
    with open(f"{out}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
