"""torchrun worker: `fused_kd_loss` with the vocabulary split over 2 ranks (tensor parallel),
with and without sequence parallelism; rank 0 writes every case's loss and full gradients.

    torchrun --nproc_per_node 2 kd_tp_worker.py OUT.pt
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.distributed as dist


def inputs():
    """The same full tensors on every rank (and in the test)."""
    g = torch.Generator().manual_seed(1)
    n, h, v = 20, 16, 64
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    teacher_logits = torch.randn(n, 24, generator=g) @ (torch.randn(v, 24, generator=g) * 0.5).t()
    mask = torch.rand(n, generator=g) > 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, teacher_logits, mask, labels


CASES = [dict(kind=k, T=T, chunk=c, sp=sp) for k, T, c, sp in itertools.product(
    ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"), (1.0, 2.0), (7, 1024),
    (False, True))]


def main(out: str) -> None:
    from qwen3kd.losses.fused import KDSpec, fused_kd_loss

    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    hidden, weight, teacher_logits, mask, labels = inputs()
    v, n = weight.shape[0], hidden.shape[0]
    cols = slice(rank * v // size, (rank + 1) * v // size)
    rows = slice(rank * n // size, (rank + 1) * n // size)
    results = []
    for case in CASES:
        h = (hidden[rows] if case["sp"] else hidden).clone().requires_grad_()
        w = weight[cols].clone().requires_grad_()
        alpha = 0.7 if case["kind"] == "forward_kl" else 1.0  # CE mixed in, vocab-parallel too
        spec = KDSpec(case["kind"], temperature=case["T"], chunk=case["chunk"], alpha=alpha)
        loss, metrics = fused_kd_loss(h, w, mask, spec, teacher_logits=teacher_logits[:, cols],
                                      labels=labels, group=dist.group.WORLD,
                                      sequence_parallel=case["sp"])
        loss.backward()
        grad_w = [torch.empty_like(w.grad) for _ in range(size)]
        dist.all_gather(grad_w, w.grad)
        grad_h = h.grad
        if case["sp"]:
            parts = [torch.empty_like(h.grad) for _ in range(size)]
            dist.all_gather(parts, h.grad)
            grad_h = torch.cat(parts)
        results.append({**case, "alpha": alpha, "loss": loss.detach(), "grad_h": grad_h,
                        "grad_w": torch.cat(grad_w), "metrics": metrics})
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
