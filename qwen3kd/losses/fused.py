"""The production KD loss: from the student's final hidden states and its output-layer shard,
vocab-parallel over tensor-parallel ranks and in chunks of tokens, never holding [tokens × V].

Per chunk of tokens each rank computes its V/TP columns of the student logits (and the teacher's,
from its logits shard or its hidden states and output-layer shard), the log-partition functions
by all-reduce (max, then sum of exp), the per-token divergence (a sum over the vocabulary:
all-reduce) and, in the same pass, the gradient with respect to the logits, which it turns at once
into gradients of the hidden states and of the weight shard. So the forward keeps O(chunk × V/TP)
of working memory whatever the sequence length, and the backward only scales the stored
gradients. The analytic gradients (u = logits / T, q = softmax(u), D the per-token divergence):
  forward_kl        dD/du = q − p
  reverse_kl        dD/du = q ⊙ (a − D),            a = log q − log p
  jsd               dD/du = q ⊙ (g − Σ q g),        g = (1−β)(log q − log m)
  skew_forward_kl   dD/du = q ⊙ (g − Σ q g),        g = −(1−λ) p / m
  skew_reverse_kl   dD/du = q ⊙ (g − Σ q g),        g = log q − log m + 1 − λ q / m
and dL/dlogits = T · dD/du (the loss is T² · D). The optional cross-entropy term uses the logits
at T = 1 and mixes in as (1 − α)·CE + α·KD on the same tokens.

With sequence parallelism the hidden states are this rank's slice of the sequence: they are
all-gathered first and their gradient reduce-scattered, as megatron's output layer does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwen3kd.losses.reference import NEG, check_kd_params, check_vocab, mix


@dataclass(frozen=True)
class KDSpec:
    kind: str
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_*_kl
    alpha: float = 1.0  # weight of KD against cross-entropy (needs labels when < 1)
    chunk: int = 192  # tokens per chunk: working memory ≈ 4 × chunk × V/TP × 4 bytes
    topk: int = 20  # for the teacher's top-k mass metric


class _Group:
    """The tensor-parallel group (None: one process, nothing to reduce)."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def log_softmax_(self, x: torch.Tensor, temperature: float, probs: torch.Tensor | None = None,
                     may_be_inf: bool = True):
        """log softmax(x / T) over the whole vocabulary, in place; with `probs`, softmax(x / T)
        into it as well. No [c, V] temporaries: max, shift, exp, sum, normalise. Logits from our
        own GEMM are finite; given logits may hold -inf (a masked vocabulary)."""
        if temperature != 1.0:
            x.div_(temperature)
        if may_be_inf:
            x.clamp_(min=NEG)
        m = self.all_reduce(x.max(-1).values, dist.ReduceOp.MAX)
        x.sub_(m[:, None])
        e = torch.exp(x, out=probs) if probs is not None else x.exp()
        total = self.all_reduce(e.sum(-1))
        x.sub_(total.log()[:, None])
        if probs is not None:
            probs.div_(total[:, None])
        return x


def _chunk_terms(log_q, log_p, q, p, spec: KDSpec, grp: _Group):
    """Per-token divergence [c] and dD/du [c, V/TP] from local (log-)probabilities (every kind
    but forward_kl, which the loop does in place)."""
    kind = spec.kind
    if kind == "reverse_kl":
        a = log_q - log_p
        d = grp.all_reduce((q * a).sum(-1))
        return d, q * (a - d[:, None])
    if kind == "jsd":
        b = spec.beta
        log_m = mix(log_p, log_q, b)
        d = grp.all_reduce((b * p * (log_p - log_m) + (1 - b) * q * (log_q - log_m)).sum(-1))
        g = (1 - b) * (log_q - log_m)
    elif kind == "skew_forward_kl":
        lam = spec.skew
        log_m = mix(log_p, log_q, lam)
        d = grp.all_reduce((p * (log_p - log_m)).sum(-1))
        g = -(1 - lam) * (log_p - log_m).exp()
    else:  # skew_reverse_kl
        lam = spec.skew
        log_m = mix(log_q, log_p, lam)
        d = grp.all_reduce((q * (log_q - log_m)).sum(-1))
        g = log_q - log_m + 1 - lam * (log_q - log_m).exp()
    qg = grp.all_reduce((q * g).sum(-1))
    return d, q * (g - qg[:, None])


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, t_hidden, t_weight, t_logits, mask, labels, groups,
                normalizer, spec: KDSpec, group, sequence_parallel: bool, need_grad: bool,
                metrics_out: torch.Tensor):
        grp = _Group(group)
        h = _gather_sequence(hidden, grp) if sequence_parallel else hidden
        th = _gather_sequence(t_hidden, grp) if (sequence_parallel and t_hidden is not None) else t_hidden
        n, T = h.shape[0], spec.temperature
        scale = 1.0 / normalizer if normalizer > 0 else 0.0  # folded into each chunk's gradient
        vocab_start = _vocab_start(weight.shape[0], grp)
        # Per group of tokens (e.g. think / no_think): loss, kl, H(p), H(q), top-k mass, ce.
        sums = torch.zeros(metrics_out.shape, dtype=torch.float64, device=h.device)
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        # Written by the first chunk's product, accumulated by the others (no zero-fill pass).
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_w_set = False
        # Reused [chunk, V/TP] buffers: no allocation (and no page faults) per chunk.
        ws = torch.empty((4, min(spec.chunk, n), weight.shape[0]), dtype=torch.float32, device=h.device)
        for i in range(0, n, spec.chunk):
            sl = slice(i, min(i + spec.chunk, n))
            m = mask[sl].to(torch.float32)  # [c]
            if not m.any():
                continue
            acc = _Accumulator(sums, groups[sl] if groups is not None else None, m)
            z, zt, q, p = ws[:, : sl.stop - sl.start]
            _logits(h[sl], weight, z)  # [c, V/TP] student logits
            if t_logits is None:
                _logits(th[sl], t_weight, zt)
            else:
                zt.copy_(t_logits[sl])
            grad_z = None
            if labels is not None:  # cross-entropy at T = 1, before z is turned into log q in place
                log_q1 = grp.log_softmax_(z.clone(), 1.0)
                ce = -grp.all_reduce(_pick(log_q1, labels[sl], vocab_start))
                acc.add(0, (1 - spec.alpha) * ce)
                acc.add(5, ce)
                if spec.alpha < 1 and need_grad:
                    grad_z = log_q1.exp_().sub_(_one_hot(labels[sl], vocab_start, z.shape[1]))
                    grad_z.mul_(((1 - spec.alpha) * scale * m)[:, None])
                del log_q1
            log_q = grp.log_softmax_(z, T, q, may_be_inf=False)
            log_p = grp.log_softmax_(zt, T, p, may_be_inf=t_logits is not None)
            if spec.kind == "forward_kl":  # the common case, in the four buffers only
                h_q = -grp.all_reduce(_rowdot(q, log_q))
                diff = log_q.neg_().add_(log_p)  # z now holds log p − log q
                d = grp.all_reduce(_rowdot(p, diff))
                _metrics(acc, None, log_p, None, p, d, spec, grp, h_q)
                dd_du = q.sub_(p)
            else:
                d, dd_du = _chunk_terms(log_q, log_p, q, p, spec, grp)
                _metrics(acc, log_q, log_p, q, p, None, spec, grp)
            acc.add(0, d * (spec.alpha * T * T))
            dd_du.mul_((m * (spec.alpha * T * scale))[:, None])  # dL/dz
            if grad_z is not None:
                dd_du.add_(grad_z)
            if need_grad:
                gz = dd_du.to(weight.dtype)
                grad_h[sl] = gz @ weight
                if not grad_w_set and weight.dtype == torch.float32:
                    torch.mm(gz.t(), h[sl], out=grad_w)
                elif not grad_w_set:
                    grad_w.copy_(gz.t() @ h[sl])
                elif weight.dtype == torch.float32:
                    grad_w.addmm_(gz.t(), h[sl])  # in place: no [V/TP, H] temporary
                else:
                    grad_w += (gz.t() @ h[sl]).float()
                grad_w_set = True
        del ws
        metrics_out.copy_(sums)
        if need_grad and not grad_w_set:  # no valid token: the gradient is zero
            grad_w.zero_()
        if need_grad:
            # Each rank's vocabulary shard contributes to dL/dh: sum over TP (and with sequence
            # parallelism keep only this rank's slice of the sequence).
            grad_h = _reduce_scatter(grad_h, grp) if sequence_parallel else grp.all_reduce(grad_h)
            # Kept on ctx, not saved tensors: backward hands them over as they are, so autograd
            # can take the [V/TP, H] buffer as the weight's .grad without copying it.
            ctx.grads = [grad_h.to(hidden.dtype), grad_w.to(weight.dtype)]
        return torch.tensor(float(sums[:, 0].sum()) * scale, dtype=torch.float32, device=h.device)

    @staticmethod
    def backward(ctx, grad_out):
        # Once only (no retain_graph through this loss): the stored gradients are handed over.
        grad_h, grad_w = ctx.grads
        del ctx.grads
        if grad_out.item() != 1.0:
            grad_h.mul_(grad_out)
            grad_w.mul_(grad_out)
        return (grad_h, grad_w) + (None,) * 12


class _Accumulator:
    """Adds masked per-token values [c] into the per-group sums [G, 6] (index_add over the
    tokens' group ids: no Python loop over groups)."""

    def __init__(self, sums: torch.Tensor, groups: torch.Tensor | None, m: torch.Tensor):
        self.sums, self.groups, self.m = sums, groups, m

    def add(self, column: int, values: torch.Tensor) -> None:
        v = (self.m * values).double()
        if self.groups is None:
            self.sums[0, column] += v.sum()
        else:
            self.sums[:, column].index_add_(0, self.groups, v)


def _logits(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    if h.dtype == torch.float32:
        torch.matmul(h, weight.t(), out=out)
    else:  # bf16 GEMM as the output layer would run it, then fp32 for the softmax
        out.copy_(h @ weight.t())


def _vocab_start(local_vocab: int, grp: _Group) -> int:
    return (dist.get_rank(grp.group) if grp.size > 1 else 0) * local_vocab


def _pick(log_q: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
    """log q[label] on the rank holding the label's column, 0 elsewhere.  # [c]"""
    local = labels - start
    inside = (local >= 0) & (local < log_q.shape[1])
    vals = log_q.gather(1, local.clamp(0, log_q.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(inside, vals, torch.zeros_like(vals))


def _one_hot(labels: torch.Tensor, start: int, width: int) -> torch.Tensor:
    local = labels - start
    inside = (local >= 0) & (local < width)
    out = torch.zeros(labels.shape[0], width, dtype=torch.float32, device=labels.device)
    out[inside, local[inside]] = 1.0
    return out


def _metrics(acc: _Accumulator, log_q, log_p, q, p, kl, spec: KDSpec, grp: _Group, h_q=None) -> None:
    """Masked sums of per-token KL(p‖q), teacher and student entropies, teacher top-k mass
    (`kl`, `h_q`: already computed by the caller)."""
    if kl is None:
        kl = grp.all_reduce(_rowdot(p, log_p - log_q))
    if h_q is None:
        h_q = -grp.all_reduce(_rowdot(q, log_q))
    h_p = -grp.all_reduce(_rowdot(p, log_p))
    top = p.topk(min(spec.topk, p.shape[1]), dim=-1).values  # [c, k]: the global top-k is
    if grp.size > 1:  # among the ranks' local top-k
        gathered = [torch.empty_like(top) for _ in range(grp.size)]
        dist.all_gather(gathered, top.contiguous(), group=grp.group)
        top = torch.cat(gathered, -1).topk(min(spec.topk, top.shape[1] * grp.size), dim=-1).values
    for j, v in zip((1, 2, 3, 4), (kl, h_p, h_q, top.sum(-1)), strict=True):
        acc.add(j, v)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, as a batched matrix product: no [c, V] temporary.  # [c, V] → [c]"""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _gather_sequence(x: torch.Tensor, grp: _Group) -> torch.Tensor:
    if grp.size == 1:
        return x
    out = torch.empty((x.shape[0] * grp.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=grp.group)
    return out


def _reduce_scatter(x: torch.Tensor, grp: _Group) -> torch.Tensor:
    """Sum over the TP ranks, keeping this rank's slice of the sequence (dim 0)."""
    if grp.size == 1:
        return x
    out = torch.empty((x.shape[0] // grp.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=grp.group)
    return out


def fused_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, spec: KDSpec, *,
                  teacher_logits: torch.Tensor | None = None,
                  teacher_hidden: torch.Tensor | None = None,
                  teacher_weight: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, normalizer: float | None = None,
                  groups: torch.Tensor | None = None, n_groups: int = 1,
                  group=None, sequence_parallel: bool = False):
    """KD loss (mixed with CE when spec.alpha < 1) from hidden states and the output-layer shard.

    hidden   [N, H] (or [N/TP, H] with sequence_parallel) student final hidden states
    weight   [V/TP, H] this rank's rows of the student output layer
    teacher  teacher_logits [N, V/TP], or teacher_hidden [N (/TP), H_t] + teacher_weight [V/TP, H_t]
    mask     [N] bool, labels [N] (global token ids: CE is mixed in when alpha < 1 and reported
             whenever labels are given)
    normalizer  the *global* number of valid tokens (over micro-batches and data-parallel ranks);
                default: this call's count.
    groups   [N] int64 in [0, n_groups): metric sums are kept per group (e.g. think / no_think).
    Returns (loss = Σ over masked tokens / normalizer, metric sums over masked tokens: kl,
    teacher_entropy, student_entropy, teacher_topk_mass, ce (with labels), loss, tokens) — one
    dict, or with `groups` a list of one dict per group. Gradients are computed in this call
    only when grad mode is on and the student needs them (so evaluation under no_grad is cheap).
    """
    grp = _Group(group)
    n = hidden.shape[0] * (grp.size if sequence_parallel else 1)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "[N, H] and [V/TP, H]")
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("give the teacher as teacher_logits or as teacher_hidden + teacher_weight")
    if teacher_logits is not None:
        teacher_cols = teacher_logits.shape[-1]
        if teacher_logits.shape[0] != n:
            raise ValueError(f"teacher_logits have {teacher_logits.shape[0]} tokens, the student {n}")
    else:
        if teacher_weight is None or teacher_hidden.shape[1] != teacher_weight.shape[1]:
            raise ValueError("teacher_hidden [N, H_t] needs teacher_weight [V/TP, H_t]")
        teacher_cols = teacher_weight.shape[0]
        if teacher_hidden.shape[0] * (grp.size if sequence_parallel else 1) != n:
            raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} tokens, the student "
                             f"{hidden.shape[0]}")
    check_vocab(weight.shape[0], teacher_cols)
    check_kd_params(spec.kind, spec.temperature, spec.beta, spec.skew)
    if mask.shape != (n,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape [{n}], got {mask.dtype} {tuple(mask.shape)}")
    if spec.alpha < 1 and (labels is None or labels.shape != (n,)):
        raise ValueError(f"alpha={spec.alpha} < 1 mixes in cross-entropy: labels [{n}] are needed")
    if not 0 <= spec.alpha <= 1 or spec.chunk < 1:
        raise ValueError(f"alpha must be in [0, 1] and chunk >= 1, got {spec.alpha}, {spec.chunk}")
    if groups is not None and (groups.shape != (n,) or groups.dtype != torch.int64):
        raise ValueError(f"groups must be an int64 tensor of shape [{n}]")
    count = int(mask.sum())
    normalizer = float(count if normalizer is None else normalizer)
    sums = torch.zeros((n_groups, 6), dtype=torch.float64)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss = _FusedKD.apply(hidden, weight, teacher_hidden, teacher_weight, teacher_logits, mask,
                          labels, groups, normalizer, spec, group, sequence_parallel, need_grad,
                          sums)
    tokens = (torch.bincount(groups[mask], minlength=n_groups) if groups is not None
              else torch.tensor([count]))
    per_group = []
    for g in range(n_groups):
        d = dict(zip(METRICS, sums[g].tolist(), strict=True))
        if labels is None:
            del d["ce"]
        d["tokens"] = float(tokens[g])
        per_group.append(d)
    return loss, (per_group if groups is not None else per_group[0])


# The columns of the per-group sums, in order.
METRICS = ("loss", "kl", "teacher_entropy", "student_entropy", "teacher_topk_mass", "ce")
