"""GRPO's pieces (Shao et al. 2024, DeepSeekMath): group-normalised advantages and the token-level
policy-gradient loss.

Strictly on-policy (one optimizer step per rollout batch, the rollouts sampled from the weights
being trained), the importance ratio π/π_old is 1 at the step's start, so PPO's clipped surrogate
reduces to the plain policy gradient −Σ_t A_t log π(y_t | y_<t) and no clipping or KL penalty is
needed. Each answer token carries its answer's advantage; like every objective here, the loss is a
sum over learned tokens, divided by the global count of learned tokens (DAPO's token-level
normalisation: long answers are not down-weighted per token).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """rewards [P, G] (G answers per prompt) → (r − group mean) / (group std + eps), the std
    unbiased (n − 1). A group whose rewards are all equal gets 0 everywhere: nothing to learn."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group_size >= 2], got {list(rewards.shape)}")
    r = rewards.double()
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).to(rewards.dtype)


def policy_gradient_loss(logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """−Σ A_t · log π(y_t) over the learned tokens (a sum: the caller divides by the token count).
    Its gradient is the REINFORCE estimator −Σ A_t ∇ log π(y_t)."""
    return -(advantages.to(logprobs.dtype) * logprobs * mask.to(logprobs.dtype)).sum()
