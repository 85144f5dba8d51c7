"""The KD losses' definition: one process, full-vocabulary logits. Every other path (vocab-parallel,
chunked, fused with the output layer) is tested against this.

p = softmax(teacher / T) (no gradient), q = softmax(student / T); per token:
  forward_kl       KL(p ‖ q)                                 (Hinton et al. 2015; "SFT-like")
  reverse_kl       KL(q ‖ p)                                 (MiniLLM, Gu et al. 2024)
  jsd              β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q   (GKD, Agarwal et al. 2024)
  skew_forward_kl  KL(p ‖ λ·p + (1−λ)·q)                     (DistiLLM, Ko et al. 2024)
  skew_reverse_kl  KL(q ‖ λ·q + (1−λ)·p)
times T², averaged over the masked tokens. 0·log 0 = 0, so columns that are -inf in both models
(e.g. padded vocabulary) contribute nothing; mixtures are formed in log space.
"""

from __future__ import annotations

import math

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")
NEG = torch.finfo(torch.float32).min / 4


def check_kd_params(kind: str, temperature: float, beta: float, skew: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if not 0 <= skew < 1:
        raise ValueError(f"skew must be in [0, 1), got {skew}")


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(f"vocabulary mismatch: the student has {student_vocab} logit columns, the "
                         f"teacher {teacher_vocab} (never truncated: the tokenizers must match)")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a (log a − log b) per row, with 0·log 0 = 0.  # [N, V] → [N]"""
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) from log a and log b."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w)) if w > 0 else log_b


def per_token_divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float,
                         skew: float) -> torch.Tensor:
    """[N, V] student / teacher log-probabilities → [N] divergence."""
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == "skew_forward_kl":
        return _kl(log_p, mix(log_p, log_q, skew))
    return _kl(log_q, mix(log_q, log_p, skew))  # skew_reverse_kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            kind: str, *, temperature: float = 1.0, beta: float = 0.5,
            skew: float = 0.1) -> torch.Tensor:
    """Mean over masked tokens of the per-token divergence.  # [N, V], [N, V], [N] → scalar

    0 with a zero gradient when nothing is masked; the gradient reaches `student_logits` only.
    """
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(f"logits must be [N, V]: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}")
    check_vocab(student_logits.shape[1], teacher_logits.shape[1])
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student logits have {student_logits.shape[0]} tokens, teacher logits "
                         f"{teacher_logits.shape[0]}")
    check_kd_params(kind, temperature, beta, skew)
    if mask.shape != student_logits.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape [{student_logits.shape[0]}], got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    # -inf (a masked vocabulary) → a huge finite value: exp() still gives exactly 0, and no
    # inf − inf turns into NaN in the mixtures or the gradient.
    s = (student_logits[mask].float() / temperature).clamp(min=NEG)
    t = (teacher_logits[mask].detach().float() / temperature).clamp(min=NEG)
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    div = per_token_divergence(log_q, log_p, kind, beta, skew)
    # Masked-out tokens are left out above (never multiplied: 0 × inf would be NaN).
    return div.sum() * temperature**2 / max(int(mask.sum()), 1)
