"""Any device without Transformer Engine / Apex (the local layer spec).

The local spec's `WrappedTorchNorm` refuses sequence parallelism:
`AssertionError: sequence parallel not supported by torch LayerNorm`. Sequence parallelism is
required for MoE with tensor parallelism in training, and is what makes TP memory-efficient.
The only thing a norm needs under SP is that its weight's gradient is summed over the TP ranks
(each saw a different slice of the sequence); megatron's `finalize_model_grads` does that for
parameters marked `sequence_parallel`, as TE / Apex norms are. So: build the same torch norm and mark
its weight. Remove when `WrappedTorchNorm` does this itself.
"""

import torch
from megatron.core.transformer import torch_norm

from megatron_patches._util import Undo, chain, swap

NAME = "sp_norm"
CPU_ONLY = False
SUPPORTED = ">=0.16.1,<0.17"

_Original = torch_norm.WrappedTorchNorm


class SequenceParallelTorchNorm:
    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        if not config.sequence_parallel:
            return _Original(config, hidden_size, eps, persist_layer_norm, zero_centered_gamma,
                             normalization)
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(
            config.normalization
        )
        if norm_cls is None or config.layernorm_zero_centered_gamma or config.persist_layer_norm:
            # Let the original raise its own message for what it does not support.
            return _Original(config, hidden_size, eps, persist_layer_norm, zero_centered_gamma,
                             normalization)
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm


def apply() -> Undo:
    # Specs and the transformer block took a reference to the class at import time: swap every
    # module-level alias of it.
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block

    undos = []
    for mod in (torch_norm, gpt_layer_specs, transformer_block, backends):
        for attr in ("WrappedTorchNorm", "LNImpl", "LayerNormImpl"):
            if getattr(mod, attr, None) is _Original:
                undos.append(swap(mod, attr, SequenceParallelTorchNorm))
    return chain(undos)
