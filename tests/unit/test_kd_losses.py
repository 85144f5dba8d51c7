"""KD losses against a float64 reference written here, independently of qwen3kd.losses: the
reference API (`kd_loss`) and the production path (`fused_kd_loss`, one process here; two TP
ranks in tests/distributed/test_kd_tp.py)."""

from __future__ import annotations

import pytest
import torch

from qwen3kd.losses.fused import KDSpec, fused_kd_loss
from qwen3kd.losses.reference import KINDS, kd_loss

LOSS_TOL, GRAD_TOL = 1e-6, 1e-5


def reference64(student, teacher, mask, kind, T=1.0, beta=0.5, skew=0.1):
    """Textbook definitions in float64 and log space. Columns that are -inf in both models for
    every token carry no probability and are left out (their gradient is 0)."""
    keep = torch.isfinite(student).any(0) | torch.isfinite(teacher).any(0)
    s = student.double()[mask][:, keep] / T
    t = teacher.double()[mask][:, keep] / T
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)

    def kl(la, lb):  # Σ a (log a − log b)
        return (la.exp() * (la - lb)).sum(-1)

    def log_mix(la, lb, w):  # log(w a + (1 − w) b)
        return torch.logsumexp(torch.stack([la + torch.log(torch.tensor(w, dtype=torch.float64)),
                                            lb + torch.log(torch.tensor(1 - w, dtype=torch.float64))]), 0)

    if kind == "forward_kl":
        d = kl(lp, lq)
    elif kind == "reverse_kl":
        d = kl(lq, lp)
    elif kind == "jsd":
        lm = log_mix(lp, lq, beta)
        d = beta * kl(lp, lm) + (1 - beta) * kl(lq, lm)
    elif kind == "skew_forward_kl":
        d = kl(lp, log_mix(lp, lq, skew))
    else:
        d = kl(lq, log_mix(lq, lp, skew))
    return d.sum() * T * T / max(int(mask.sum()), 1)


def _inputs(n=12, v=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def _close(ours, ref, tol):
    return (ours.double() - ref).abs().max().item() <= tol * max(ref.abs().max().item(), 1e-30)


def _check(student, teacher, mask, kind, T):
    s64 = student.double().requires_grad_()
    ref = reference64(s64, teacher, mask, kind, T)
    (ref_grad,) = torch.autograd.grad(ref, s64) if mask.any() else (torch.zeros_like(s64),)
    s = student.clone().requires_grad_()
    loss = kd_loss(s, teacher, mask, kind, temperature=T)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert _close(loss, ref, LOSS_TOL), (loss.item(), ref.item())
    assert _close(s.grad, ref_grad, GRAD_TOL) or not mask.any()
    return loss, s.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_every_kind_matches_float64(kind, T):
    student, teacher = _inputs()
    for mask in (torch.ones(12, dtype=torch.bool),
                 torch.arange(12) % 3 == 0,
                 torch.arange(12) == 5):  # all, some, one token
        _check(student, teacher, mask, kind, T)
    big_s, big_t = _inputs(scale=1e4)  # ±1e4 logits: near one-hot, huge log-ratios
    _check(big_s.clamp(-1e4, 1e4), big_t.clamp(-1e4, 1e4), torch.ones(12, dtype=torch.bool), kind, T)
    s, t = _inputs()
    s[:, 7:10] = t[:, 7:10] = float("-inf")  # a masked vocabulary slice in both models
    _, grad = _check(s, t, torch.ones(12, dtype=torch.bool), kind, T)
    assert (grad[:, 7:10] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_no_masked_token_gives_zero_loss_and_zero_gradient(kind):
    student, teacher = _inputs()
    s = student.clone().requires_grad_()
    loss = kd_loss(s, teacher, torch.zeros(12, dtype=torch.bool), kind)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_gradient_reaches_the_student_only():
    student, teacher = _inputs()
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    kd_loss(s, t, torch.ones(12, dtype=torch.bool), "jsd").backward()
    assert s.grad is not None and t.grad is None


def test_bad_input_is_a_clear_error():
    s, t = _inputs()
    mask = torch.ones(12, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown KD loss kind 'kl'"):
        kd_loss(s, t, mask, "kl")
    with pytest.raises(ValueError, match="vocabulary mismatch: the student has 50 logit columns, the teacher 49"):
        kd_loss(s, t[:, :49], mask, "forward_kl")
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[12\]"):
        kd_loss(s, t, mask[:5], "forward_kl")
    with pytest.raises(ValueError, match=r"logits must be \[N, V\]"):
        kd_loss(s[None], t[None], mask, "forward_kl")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fused_kd_loss(torch.randn(12, 8), torch.randn(50, 8), mask, KDSpec("forward_kl"),
                      teacher_logits=t[:, :49])


# ---- the production path, one process ------------------------------------------------------
def _fused_vs_reference(kind, T, chunk, teacher_as_hidden, alpha=1.0):
    g = torch.Generator().manual_seed(1)
    n, h, v = 20, 16, 64
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    t_hidden, t_weight = torch.randn(n, 24, generator=g), torch.randn(v, 24, generator=g) * 0.5
    teacher_logits = t_hidden @ t_weight.t()
    mask = torch.rand(n, generator=g) > 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    hs, ws = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    spec = KDSpec(kind, temperature=T, chunk=chunk, alpha=alpha)
    teacher = dict(teacher_hidden=t_hidden, teacher_weight=t_weight) if teacher_as_hidden \
        else dict(teacher_logits=teacher_logits)
    loss, metrics = fused_kd_loss(hs, ws, mask, spec, labels=labels, **teacher)
    loss.backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = hr @ wr.t()
    ref = alpha * kd_loss(logits, teacher_logits, mask, kind, temperature=T)
    if alpha < 1:
        ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        ref = ref + (1 - alpha) * ce
    ref.backward()
    return (loss, hs.grad, ws.grad), (ref, hr.grad, wr.grad), metrics, (logits, teacher_logits, mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [7, 1024])  # chunked (uneven last chunk) and in one piece
def test_fused_path_equals_the_reference(megatron_world, kind, T, chunk):
    ours, ref, _, _ = _fused_vs_reference(kind, T, chunk, teacher_as_hidden=chunk == 7)
    assert _close(ours[0], ref[0].double(), LOSS_TOL)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert _close(a, b.double(), GRAD_TOL)


def test_fused_mixes_cross_entropy_and_reports_metrics(megatron_world):
    ours, ref, metrics, (logits, teacher_logits, mask) = _fused_vs_reference(
        "forward_kl", 1.0, 5, False, alpha=0.3)
    assert _close(ours[0], ref[0].double(), LOSS_TOL)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert _close(a, b.double(), GRAD_TOL)
    p = torch.softmax(teacher_logits[mask].double(), -1)
    q = torch.softmax(logits[mask].detach().double(), -1)
    n = int(mask.sum())
    assert metrics["tokens"] == n
    assert metrics["kl"] / n == pytest.approx(reference64(logits.detach(), teacher_logits, mask, "forward_kl").item(), rel=1e-6)
    assert metrics["teacher_entropy"] / n == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-6)
    assert metrics["student_entropy"] / n == pytest.approx(-(q * q.log()).sum(-1).mean().item(), rel=1e-6)
    assert metrics["teacher_topk_mass"] / n == pytest.approx(p.topk(20, -1).values.sum(-1).mean().item(), rel=1e-6)


def test_fused_with_no_valid_token_is_zero(megatron_world):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss, _ = fused_kd_loss(hidden, weight, torch.zeros(6, dtype=torch.bool), KDSpec("jsd"),
                            teacher_logits=torch.randn(6, 10))
    loss.backward()
    assert loss.item() == 0.0 and (hidden.grad == 0).all() and (weight.grad == 0).all()


# ---- sparse teacher signals ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_topk_loss_is_a_lower_bound_that_reaches_the_exact_loss_at_k_equal_v(kind):
    from qwen3kd.losses.sparse import topk_kd_loss

    student, teacher = _inputs(n=16, v=64, scale=2.0)
    mask = torch.arange(16) % 4 != 3
    exact = kd_loss(student, teacher, mask, kind).item()
    top = torch.log_softmax(teacher, -1).topk(64, -1)
    gaps = []
    for k in (1, 4, 16, 48, 64):
        s = student.clone().requires_grad_()
        loss = topk_kd_loss(s, top.values[:, :k], top.indices[:, :k], mask, kind)
        loss.backward()
        assert torch.isfinite(s.grad).all()
        gaps.append(exact - loss.item())
    assert all(g >= -1e-6 * exact for g in gaps)  # merging outcomes never raises a divergence
    assert gaps == sorted(gaps, reverse=True)  # more ids, closer
    assert abs(gaps[-1]) <= 1e-5 * exact  # k = V: the full loss (up to fp32 rounding)
    assert gaps[0] > 1e-3 * exact  # and k = 1 really is biased


def test_topk_rejects_bad_ids():
    from qwen3kd.losses.sparse import topk_kd_loss

    s, t = _inputs()
    top = torch.log_softmax(t, -1).topk(4, -1)
    with pytest.raises(ValueError, match=r"ids in \[0, 50\)"):
        topk_kd_loss(s, top.values, top.indices + 50, torch.ones(12, dtype=torch.bool))


def test_sampled_reverse_kl_is_unbiased_in_value_and_gradient():
    """Many tokens sampled from the same student distribution: the estimator's mean and its
    gradient match the exact reverse KL and its gradient within Monte-Carlo error."""
    from qwen3kd.losses.sparse import sampled_reverse_kl

    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(6, generator=g), torch.randn(6, generator=g)
    n = 200_000
    z = zs.clone().requires_grad_()
    log_q = torch.log_softmax(z, -1)
    y = torch.multinomial(log_q.exp().detach(), n, replacement=True, generator=g)
    loss, estimate = sampled_reverse_kl(log_q[y], torch.log_softmax(zt, -1)[y],
                                        torch.ones(n, dtype=torch.bool))
    loss.backward()
    ze = zs.clone().requires_grad_()
    exact = kd_loss(ze[None], zt[None], torch.ones(1, dtype=torch.bool), "reverse_kl")
    exact.backward()
    assert estimate.item() == pytest.approx(exact.item(), abs=0.02)
    assert (z.grad - ze.grad).abs().max().item() < 0.02


def test_fused_gradient_follows_the_upstream_gradient(megatron_world):
    """A scaled loss (e.g. a loss-scale or a mixing weight) scales the handed-over gradients."""
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(12, 8, generator=g)
    teacher = torch.randn(9, 12, generator=g)
    mask = torch.ones(9, dtype=torch.bool)
    grads = []
    for factor in (1.0, 2.5):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fused_kd_loss(h, w, mask, KDSpec("reverse_kl", chunk=4), teacher_logits=teacher)
        (factor * loss).backward()
        grads.append((h.grad, w.grad))
    assert torch.allclose(grads[1][0], 2.5 * grads[0][0]) and torch.allclose(grads[1][1], 2.5 * grads[0][1])


def test_fused_metrics_per_group_add_up_and_match_each_groups_own_call(megatron_world):
    """Per-mode metrics: sums kept per token group equal a call on that group's tokens alone;
    under no_grad nothing is differentiated and the values are the same."""
    g = torch.Generator().manual_seed(2)
    n, h, v = 30, 16, 64
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    teacher = torch.randn(n, v, generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    labels = torch.randint(0, v, (n,), generator=g)
    groups = torch.randint(0, 3, (n,), generator=g)
    spec = KDSpec("reverse_kl", temperature=2.0, chunk=7)
    with torch.no_grad():
        loss, per_group = fused_kd_loss(hidden, weight, mask, spec, teacher_logits=teacher,
                                        labels=labels, groups=groups, n_groups=3)
    _, whole = fused_kd_loss(hidden, weight, mask, spec, teacher_logits=teacher, labels=labels)
    for key in ("kl", "ce", "teacher_entropy", "tokens"):
        assert sum(d[key] for d in per_group) == pytest.approx(whole[key], rel=1e-9)
    for k in range(3):
        _, alone = fused_kd_loss(hidden, weight, mask & (groups == k), spec, teacher_logits=teacher,
                                 labels=labels)
        for key in ("kl", "ce", "student_entropy", "loss", "tokens"):
            assert per_group[k][key] == pytest.approx(alone[key], rel=1e-9), (k, key)
    assert float(loss) == pytest.approx(sum(d["loss"] for d in per_group) / whole["tokens"], rel=1e-6)
