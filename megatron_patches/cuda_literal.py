"""CPU only. megatron-core hard-codes `device="cuda"` in code every run reaches:
`transformer/utils.py` `get_default_causal_mask` (every forward without an explicit mask),
`pipeline_parallel/schedules.py` (`total_num_tokens = torch.zeros(…, device="cuda")`), the
optimizer's grad-norm / clipping buffers, and `.cuda()` calls.

Without it, the first GPTModel forward fails with
`AssertionError: Torch not compiled with CUDA enabled` (from `get_default_causal_mask`).
Fix: a TorchFunctionMode, entered on the main thread, that rewrites CUDA `device=` arguments,
`Tensor.to(<cuda>)` and `Tensor.cuda()` to the CPU. Cost: ~0.6 ms on a 4 ms tiny fwd+bwd.
Remove when megatron-core takes its device from the model instead of a literal.
"""

import torch
from torch.overrides import TorchFunctionMode

from megatron_patches._util import Undo

NAME = "cuda_literal"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # a bare index means a CUDA device


class CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def apply() -> Undo:
    mode = CudaToCpuMode()
    mode.__enter__()
    return lambda: mode.__exit__(None, None, None)
