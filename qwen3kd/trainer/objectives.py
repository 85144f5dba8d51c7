"""What a micro-batch's forward computes and how its loss is reported: plain cross-entropy for the
student alone, distillation from the co-located teacher, or a policy gradient on a verifier's
reward (on-policy reinforcement learning, the comparison arm of distillation).

Loss normalisation (DESIGN.md): every micro-batch returns a *sum* over its learned tokens and their
count; megatron's schedule adds the counts over micro-batches, `finalize_model_grads` all-reduces
them over data-parallel ranks and divides the gradients by the total, so the gradient is that of
the mean over all learned tokens of the global batch. Each objective also returns report sums,
which `Trainer.global_sums` adds over micro-batches and ranks and `summarise` turns into metrics.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from qwen3kd.config.schema import JobConfig, KDConfig
from qwen3kd.data.batches import MicroBatch
from qwen3kd.data.chat import MODES
from qwen3kd.losses.fused import METRICS, KDSpec, fused_kd_loss
from qwen3kd.losses.policy_gradient import policy_gradient_loss
from qwen3kd.teacher.frozen import Teacher


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_device(batch: MicroBatch):
    dev = device()
    tokens, pos, labels, mask = (t.to(dev, non_blocking=True) for t in
                                 (batch.tokens, batch.position_ids, batch.labels, batch.loss_mask))
    attn = batch.attention_mask()
    return tokens, pos, labels, mask, attn.to(dev) if attn is not None else None


@contextlib.contextmanager
def final_hidden(model: torch.nn.Module):
    """Run a GPTModel (possibly wrapped) up to its final norm: on the last pipeline stage it
    returns the hidden states [S, B, H] the output layer would read, not the logits."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if not gpt.post_process:
        yield
        return
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = True


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output layer's weight shard [V/TP, H] (the embedding when they are tied)."""
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


class _StudentOnly:
    """An objective without the teacher: one wave per step, no teacher phase."""

    def waves(self, batches: list) -> list[list]:
        return [batches]

    def scored(self, batches: list):
        return contextlib.nullcontext()


class LMObjective(_StudentOnly):
    """Causal-LM cross-entropy (megatron's own loss, from the logits)."""

    shape = (2,)  # loss sum, tokens

    def forward_step(self, data_iterator, model):
        tokens, pos, labels, mask, attn = _to_device(next(data_iterator))
        out = model(tokens, pos, attn, labels=labels)  # [B, S] per-token CE
        return out, partial(self.loss, mask)

    @staticmethod
    def loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
        mask = loss_mask.to(per_token_loss.dtype)
        loss_sum = (per_token_loss.float() * mask).sum()
        n = mask.sum().to(torch.int)
        return loss_sum, n, {"report": torch.stack([loss_sum.detach(), n.float()]).double()}

    @staticmethod
    def summarise(total: torch.Tensor, prefix: str) -> dict[str, float]:
        loss_sum, tokens = total.tolist()
        return {f"{prefix}/loss": loss_sum / max(tokens, 1.0), f"{prefix}/tokens": tokens}


class GRPOObjective(_StudentOnly):
    """GRPO on the student's own answers (onpolicy.objective=grpo): each answer token's loss is
    −A · log π(token), A its answer's group-normalised advantage (losses/policy_gradient.py), with
    log π from megatron's vocabulary-parallel cross-entropy. The teacher takes no part."""

    shape = (len(MODES), 2)  # per mode: loss sum, tokens

    def forward_step(self, data_iterator, model):
        batch: MicroBatch = next(data_iterator)
        tokens, pos, labels, mask, attn = _to_device(batch)
        dev = tokens.device
        adv = batch.advantages.to(dev) if batch.advantages is not None else torch.zeros_like(mask)
        modes = batch.modes.to(dev) if batch.modes is not None else torch.zeros_like(labels)
        out = model(tokens, pos, attn, labels=labels)  # [B, S] per-token CE = −log π
        return out, partial(self.loss, mask, adv, modes)

    @staticmethod
    def loss(mask: torch.Tensor, adv: torch.Tensor, modes: torch.Tensor, per_token_ce: torch.Tensor):
        logp = -per_token_ce.float()
        loss = policy_gradient_loss(logp, adv, mask)
        per_token = (-adv * logp * mask).detach()
        report = torch.zeros(len(MODES), 2, dtype=torch.float64, device=mask.device)
        report[:, 0].index_add_(0, modes.reshape(-1), per_token.reshape(-1).double())
        report[:, 1].index_add_(0, modes.reshape(-1), mask.reshape(-1).double())
        return loss, mask.sum().to(torch.int), {"report": report.cpu()}

    @staticmethod
    def summarise(total: torch.Tensor, prefix: str) -> dict[str, float]:
        tok = total[:, 1]
        out = {f"{prefix}/loss": float(total[:, 0].sum() / tok.sum().clamp(min=1)),
               f"{prefix}/tokens": float(tok.sum())}
        for i, mode in enumerate(MODES):
            if tok[i] > 0:
                out[f"{prefix}/tokens/{mode.value}"] = float(tok[i])
                out[f"{prefix}/loss/{mode.value}"] = float(total[i, 0] / tok[i])
        return out


class KDObjective:
    """Distillation: the teacher's phase runs first over the wave's micro-batches (`scored`),
    then the student's schedule; the KD loss (mixed with CE when kd.alpha < 1) comes from the
    student's final hidden states and output-layer shard and the teacher's hidden states and
    output-layer copy (split like the student's vocabulary), vocabulary-parallel and chunked."""

    def __init__(self, cfg: JobConfig, teacher: Teacher, with_ce: bool,
                 n_groups: int = len(MODES), kd: KDConfig | None = None):
        from megatron.core import parallel_state as ps

        k = kd or cfg.kd
        self.spec = KDSpec(kind=k.kind.value, temperature=k.temperature, beta=k.beta, skew=k.skew,
                           alpha=k.alpha, chunk=k.chunk, topk=k.topk)
        self.teacher, self.with_ce, self.n_groups = teacher, with_ce or k.alpha < 1, n_groups
        self.tp_group = ps.get_tensor_model_parallel_group() if cfg.parallel.tensor > 1 else None
        self.sp = cfg.parallel.sequence_parallel
        self.shape = (n_groups, len(METRICS) + 1)  # per group: METRICS sums, tokens

    def waves(self, batches: list) -> list[list]:
        return self.teacher.waves(batches)

    def scored(self, batches: list):
        """The teacher's phase for these micro-batches, and their hidden states while inside."""
        return self.teacher.scoring(batches)

    def forward_step(self, data_iterator, model):
        batch: MicroBatch = next(data_iterator)
        tokens, pos, labels, mask, attn = _to_device(batch)
        with final_hidden(model):
            hidden = model(tokens, pos, attn)  # [S(/TP), B, H] on the last stage
        groups = batch.groups if batch.groups is not None else batch.modes
        # The loss runs on the last stage only, where the teacher phase left the hidden states;
        # read them from the batch then, not now (other stages have none).
        return hidden, partial(self.loss, model, batch, labels, mask, groups)

    def loss(self, model, batch: MicroBatch, labels, mask, groups, hidden):
        t_hidden = batch.teacher_hidden
        # Tokens in [S, B] order, as the hidden states are laid out.
        flat = lambda t: t.t().reshape(-1)  # noqa: E731
        g = flat(groups.to(labels.device)) if groups is not None else torch.zeros_like(flat(labels))
        loss, per_group = fused_kd_loss(
            hidden.reshape(-1, hidden.shape[-1]), output_weight(model), flat(mask).bool(), self.spec,
            teacher_hidden=t_hidden.reshape(-1, t_hidden.shape[-1]),
            teacher_weight=self.teacher.head.weight,
            labels=flat(labels) if self.with_ce else None, normalizer=1.0, groups=g,
            n_groups=self.n_groups, group=self.tp_group, sequence_parallel=self.sp,
        )
        report = torch.tensor([[d.get(k, 0.0) for k in (*METRICS, "tokens")] for d in per_group],
                              dtype=torch.float64)
        n = mask.sum().to(torch.int)
        return loss, n, {"report": report}

    def summarise(self, total: torch.Tensor, prefix: str) -> dict[str, float]:
        """Per-token means, overall and per mode (train/kl/think, …)."""
        tok = total[:, -1]
        out = {f"{prefix}/loss": float(total[:, 0].sum() / tok.sum().clamp(min=1)),
               f"{prefix}/tokens": float(tok.sum())}
        names = [m for m in METRICS[1:] if m != "ce" or self.with_ce]
        for name in names:
            col = METRICS.index(name)
            out[f"{prefix}/{name}"] = float(total[:, col].sum() / tok.sum().clamp(min=1))
        by_mode = total.reshape(-1, len(MODES), total.shape[1]).sum(0)  # groups = mode + 2·slot
        for i, mode in enumerate(MODES):
            if by_mode[i, -1] > 0:
                out[f"{prefix}/tokens/{mode.value}"] = float(by_mode[i, -1])
                for name in ("loss", *names):
                    col = METRICS.index(name)
                    out[f"{prefix}/{name}/{mode.value}"] = float(by_mode[i, col] / by_mode[i, -1])
        return out
