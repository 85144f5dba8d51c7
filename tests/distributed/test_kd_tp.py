"""The production KD loss with the vocabulary split over TP=2 ranks (logsumexp and sums by
all-reduce), with and without sequence parallelism, chunked and not, equals the reference API
(relative error ≤ 1e-6 for the loss, ≤ 1e-5 for the gradients)."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import ROOT, torchrun

from qwen3kd.losses.reference import kd_loss

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from kd_tp_worker import CASES, inputs  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "results.pt"
    torchrun(ROOT / "tests/distributed/kd_tp_worker.py", str(out))
    return torch.load(out)


def _close(ours, ref, tol):
    return (ours.double() - ref.double()).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i].values())))
def test_tp2_equals_reference(results, i):
    r = results[i]
    hidden, weight, teacher_logits, mask, labels = inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.t()
    ref = r["alpha"] * kd_loss(logits, teacher_logits, mask, r["kind"], temperature=r["T"])
    if r["alpha"] < 1:
        ref = ref + (1 - r["alpha"]) * torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    ref.backward()
    assert _close(r["loss"], ref.detach(), 1e-6), (r["loss"].item(), ref.item())
    assert _close(r["grad_h"], h.grad, 1e-5)
    assert _close(r["grad_w"], w.grad, 1e-5)
    assert r["metrics"]["tokens"] == int(mask.sum())
