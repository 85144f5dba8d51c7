"""CPU only. The pipeline's `p2p_communication._communicate` calls `torch.cuda.synchronize()` after
each batch of point-to-point ops (and DDP calls it around buffer frees).

Without it, any run with pipeline parallelism > 1 fails on the first p2p exchange with
`AssertionError: Torch not compiled with CUDA enabled`.
Fix: `torch.cuda.synchronize` is a no-op when CUDA is absent (gloo p2p ops are synchronous).
Remove when megatron-core guards the call with `torch.cuda.is_available()`.
"""

import torch

from megatron_patches._util import Undo, swap

NAME = "cuda_sync"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"


def apply() -> Undo:
    return swap(torch.cuda, "synchronize", lambda device=None: None)
