"""CPU only. megatron-core calls `torch.cuda.current_device()` in ~175 places to place tensors
(e.g. `rotary_pos_embedding.py`: `inv_freq.to(torch.cuda.current_device())`).

Without it, on a machine without CUDA, the first GPTModel forward fails with
`AssertionError: Torch not compiled with CUDA enabled`.
Fix: `torch.cuda.current_device()` returns "cpu", a valid `device=` argument.
Remove when megatron-core places tensors with a device object it is given.
"""

import torch

from megatron_patches._util import Undo, swap

NAME = "current_device"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"


def apply() -> Undo:
    return swap(torch.cuda, "current_device", lambda: "cpu")
