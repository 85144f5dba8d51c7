"""KD from sparse teacher signals: the teacher's top-k log-probabilities, or only the log-probability
of the token the student sampled (on-policy).

Top-k with a residual bucket. The teacher sends, per token, its k most likely ids and their
log-probabilities (at T = 1, as an inference engine returns them). Both distributions are folded
onto k + 1 outcomes: the k ids, and "anything else". The teacher's residual mass is 1 − Σ kept,
computed in log space as log(−expm1(logsumexp(kept))) (a mass below the rounding error of the
sum, k · 2⁻²³, counts as empty); the student's is summed exactly over its other columns.
Any divergence of `reference.KINDS` is then taken over the k + 1 outcomes.
Bias: merging outcomes can only lower an f-divergence (data-processing inequality), so the top-k
loss is a lower bound of the full-vocabulary one; the gap is the divergence *inside* the residual
bucket, weighted by its mass. It is exact when the residual mass is 0, and approaches the exact
loss as k → V (tested). Dropping the bucket instead (renormalising over the top k) is biased in
either direction and can even make "KL" negative; we never do that, nor clamp.

Sampled-token reverse KL (on-policy). For a token y sampled from the student q, the per-token
estimator is log q(y) − log p(y): its expectation over y ~ q is KL(q ‖ p) at that position
(unbiased, but high-variance: it is one sample of a sum over V). As a training signal it is used
as a reward of a policy gradient: loss = sg(log q(y) − log p(y)) · log q(y), whose expected
gradient is ∇ KL(q ‖ p) at that position. It ignores how the token changes later positions'
distributions (a per-token, discount-0 estimator), as in on-policy distillation practice.
"""

from __future__ import annotations

import torch

from qwen3kd.losses.reference import NEG, check_kd_params, per_token_divergence


def _teacher_with_residual(log_kept: torch.Tensor) -> torch.Tensor:
    """[N, k] teacher log-probabilities → [N, k + 1], the residual mass appended."""
    k = log_kept.shape[-1]
    rest = -torch.expm1(torch.logsumexp(log_kept, -1, keepdim=True))  # 1 − Σ kept, precisely
    # Below the rounding error of a k-term fp32 sum the bucket is empty (a complete top-k).
    some = rest > k * torch.finfo(torch.float32).eps
    residual = torch.where(some, torch.log(torch.where(some, rest, torch.ones_like(rest))),
                           torch.full_like(rest, NEG))
    return torch.cat([log_kept, residual], -1)


def _student_with_residual(log_q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[N, V] student log-probabilities → [N, k + 1]: the ids', then the rest's, summed exactly
    over the other columns (no 1 − Σ cancellation)."""
    rest = log_q.scatter(-1, ids, NEG).logsumexp(-1, keepdim=True).clamp(min=NEG)
    return torch.cat([log_q.gather(-1, ids), rest], -1)


def topk_kd_loss(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                 teacher_topk_ids: torch.Tensor, mask: torch.Tensor, kind: str = "forward_kl", *,
                 beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """Mean over masked tokens of the divergence over the teacher's top-k ids + one residual
    bucket.  # [N, V], [N, k], [N, k], [N] → scalar (gradient to student_logits only)"""
    n, v = student_logits.shape
    k = teacher_topk_ids.shape[-1]
    if teacher_topk_logprobs.shape != (n, k) or teacher_topk_ids.shape != (n, k):
        raise ValueError(f"teacher top-k log-probs {tuple(teacher_topk_logprobs.shape)} and ids "
                         f"{tuple(teacher_topk_ids.shape)} must both be [{n}, k]")
    if k > v or int(teacher_topk_ids.max()) >= v or int(teacher_topk_ids.min()) < 0:
        raise ValueError(f"teacher top-k ids must be {k} distinct ids in [0, {v}) per token")
    if mask.shape != (n,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape [{n}], got {mask.dtype} {tuple(mask.shape)}")
    check_kd_params(kind, 1.0, beta, skew)
    log_q_all = torch.log_softmax(student_logits[mask].float().clamp(min=NEG), -1)
    ids = teacher_topk_ids[mask]
    log_q = _student_with_residual(log_q_all, ids)
    log_p = _teacher_with_residual(teacher_topk_logprobs[mask].detach().float())
    div = per_token_divergence(log_q, log_p, kind, beta, skew)
    return div.sum() / max(int(mask.sum()), 1)


def sampled_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token on-policy estimator for tokens sampled from the student.  # [N], [N], [N] →

    Returns (loss, estimate): `loss` = mean of sg(log q − log p) · log q, whose gradient is the
    score-function gradient of KL(q ‖ p); `estimate` = mean of log q − log p, the value (detached).
    """
    if student_logprobs.shape != teacher_logprobs.shape or mask.shape != student_logprobs.shape:
        raise ValueError(f"student log-probs {tuple(student_logprobs.shape)}, teacher log-probs "
                         f"{tuple(teacher_logprobs.shape)} and mask {tuple(mask.shape)} must match")
    n = max(int(mask.sum()), 1)
    lq = student_logprobs[mask]
    diff = (lq - teacher_logprobs[mask].detach()).detach()
    return (diff * lq).sum() / n, diff.sum() / n
