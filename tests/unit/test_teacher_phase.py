"""The teacher's memory choreography around a step, with recording stand-ins (as NeMo-RL tests its
colocated choreography): its weights on the device only for its own phase, its output-layer copy
only for the student's forward-backward, the hidden states released after each wave, gradients
finalised once after all waves; and the waves themselves."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qwen3kd.data.batches import MicroBatch
from qwen3kd.teacher.frozen import Teacher


class RecordingHead:
    def __init__(self, calls):
        self.calls, self.weight = calls, torch.zeros(1)

    def onload(self):
        self.calls.append("head.onload")

    def offload(self):
        self.calls.append("head.offload")


def recording_teacher(calls, wave_tokens=None) -> Teacher:
    t = Teacher.__new__(Teacher)
    t.cfg = SimpleNamespace(wave_tokens=wave_tokens, offload=True)
    t.train = SimpleNamespace(micro_batch_size=2, seq_length=8)
    t.head = RecordingHead(calls)
    t.onload = lambda: calls.append("teacher.onload")
    t.offload = lambda: calls.append("teacher.offload")

    def score(batches):
        calls.append(f"teacher.score({len(batches)})")
        for mb in batches:
            mb.teacher_hidden = torch.ones(8, 2, 4)

    t.score = score
    return t


def batches(n: int) -> list[MicroBatch]:
    z = torch.zeros(2, 8, dtype=torch.int64)
    return [MicroBatch(tokens=z, labels=z, loss_mask=torch.ones(2, 8), position_ids=z)
            for _ in range(n)]


def trainer(calls, teacher, monkeypatch):
    from qwen3kd.trainer import loop
    from qwen3kd.trainer.loop import Trainer
    from qwen3kd.trainer.objectives import KDObjective

    objective = KDObjective.__new__(KDObjective)
    objective.teacher = teacher
    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(train=teacher.train)
    t.model = [SimpleNamespace(zero_grad_buffer=lambda: calls.append("student.zero_grad"))]
    t.optimizer = SimpleNamespace(zero_grad=lambda: None)
    t.objectives, t.phase, t.reports_loss = {"p": objective}, "p", True

    def schedule(model, obj, wave, *args, forward_only):
        held = [mb.teacher_hidden is not None for mb in wave]
        calls.append(f"student.forward_backward({len(wave)}, teacher hidden held: {all(held)})")
        return torch.zeros(1)

    monkeypatch.setattr(loop, "run_schedule", schedule)
    monkeypatch.setattr("megatron.core.distributed.finalize_model_grads",
                        lambda model, tokens: calls.append(f"finalize_model_grads({int(tokens)})"))
    return t


def test_one_wave(monkeypatch):
    calls, mbs = [], batches(3)
    trainer(calls, recording_teacher(calls), monkeypatch).forward_backward(mbs)
    assert calls == [
        "student.zero_grad",
        "teacher.onload", "teacher.score(3)", "teacher.offload",  # weights on the device: its phase
        "head.onload", "student.forward_backward(3, teacher hidden held: True)", "head.offload",
        "finalize_model_grads(48)",  # 3 micro-batches × 2 rows × 8 learned tokens
    ]
    assert all(mb.teacher_hidden is None for mb in mbs)  # the payload does not outlive the step


def test_waves_cut_the_step_and_gradients_are_finalised_once(monkeypatch):
    calls, mbs = [], batches(5)
    teacher = recording_teacher(calls, wave_tokens=32)  # 32 // (2 × 8) = 2 micro-batches a wave
    assert [len(w) for w in teacher.waves(mbs)] == [2, 2, 1]
    trainer(calls, teacher, monkeypatch).forward_backward(mbs)
    wave = lambda n: ["teacher.onload", f"teacher.score({n})", "teacher.offload", "head.onload",  # noqa: E731
                      f"student.forward_backward({n}, teacher hidden held: True)", "head.offload"]
    assert calls == ["student.zero_grad", *wave(2), *wave(2), *wave(1), "finalize_model_grads(80)"]
    assert all(mb.teacher_hidden is None for mb in mbs)


def test_a_failing_teacher_phase_gives_the_device_back():
    calls = []
    t = recording_teacher(calls)

    def broken(batches):
        calls.append("teacher.score")
        raise RuntimeError("boom")

    t.score = broken
    try:
        with t.scoring(batches(1)):
            calls.append("never")
    except RuntimeError:
        pass
    assert calls == ["teacher.onload", "teacher.score", "teacher.offload"]
