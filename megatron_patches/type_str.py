"""CPU only. megatron-core's optimizers check parameter types by CUDA type name:
`DistributedOptimizer._build_model_and_main_param_groups` and
`Float16OptimizerWithFloat16Params` raise
`TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, torch.cuda.HalfTensor, or
torch.cuda.BFloat16Tensor. Received torch.FloatTensor`, and `clip_grads.clip_grad_by_total_norm_fp32`
does `assert param.grad.type() == 'torch.cuda.FloatTensor'` (a bare AssertionError whenever
`optim.clip_grad > 0`).

Fix: a TorchFunctionMode in which an argument-less `Tensor.type()` called from
`megatron.core.optimizer` reports the CUDA name of a CPU tensor (only there: every other caller
sees the truth). Remove when megatron-core checks `dtype` instead of type names.
"""

import sys

import torch
from torch.overrides import TorchFunctionMode

from megatron_patches._util import Undo

NAME = "type_str"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"

_CUDA_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _caller_module() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith(("torch", "megatron_patches")):
            return name
        frame = frame.f_back
    return ""


class CudaTypeNameMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and out in _CUDA_NAMES
            and _caller_module().startswith("megatron.core.optimizer")
        ):
            return _CUDA_NAMES[out]
        return out


def apply() -> Undo:
    mode = CudaTypeNameMode()
    mode.__enter__()
    return lambda: mode.__exit__(None, None, None)
