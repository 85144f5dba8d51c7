"""CPU only. The alltoall MoE dispatcher turns its split sizes into numpy with
`moe_utils.maybe_move_tensor_to_cpu(t, as_numpy=True)`, which only converts *CUDA* tensors. On a
CPU the splits stay tensors and expert-parallel runs fail in
`all_to_all_single(...)` with `TypeError: all_to_all_single(): incompatible function arguments`.

Fix: convert CPU tensors to numpy as well when asked to. Remove when megatron-core does so.
"""

import torch
from megatron.core.transformer.moe import moe_utils, token_dispatcher

from megatron_patches._util import Undo, chain, swap

NAME = "a2a_splits"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"

_original = moe_utils.maybe_move_tensor_to_cpu


def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor) and not tensor.is_cuda:
        return tensor.numpy() if as_numpy else tensor
    return _original(tensor, as_numpy=as_numpy, record_stream=record_stream)


def apply() -> Undo:
    # token_dispatcher imported the function by name, so both module attributes are swapped.
    return chain([
        swap(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu),
        swap(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu),
    ])
