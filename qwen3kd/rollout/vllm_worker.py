"""Runs inside vLLM's worker processes (`worker_extension_cls`): the trainer's weight push.

vLLM mixes this class into its worker, so the trainer calls these methods by name through
`LLM.collective_rpc` — no pickled callables (VLLM_ALLOW_INSECURE_SERIALIZATION stays off). Weights
travel as safetensors bytes, serialised in memory (never a file), in buckets of bounded size;
`qwen3kd_commit` loads them all with vLLM's in-place `reload_weights`, which runs the model's own
post-load processing (the CPU backend repacks its linear layers there; calling the model's
`load_weights` directly would leave the repacked copies stale).
"""

from __future__ import annotations


class WeightSyncExtension:
    def qwen3kd_receive(self, payload: bytes) -> int:
        from safetensors.torch import load

        pending = self.__dict__.setdefault("_qwen3kd_pending", [])
        tensors = load(payload)
        pending.extend(tensors.items())
        return len(tensors)

    def qwen3kd_commit(self) -> int:
        pending = self.__dict__.pop("_qwen3kd_pending", [])
        self.model_runner.reload_weights(weights_iterator=iter(pending))
        return len(pending)
