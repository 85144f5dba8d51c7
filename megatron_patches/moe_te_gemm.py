"""Any device without Transformer Engine (a megatron-core bug, not CPU-specific).

`transformer/moe/moe_utils.py` imports `te_general_gemm` only inside `try: import
transformer_engine …` and never defines it in the `except ImportError` branch, so every MoE router
forward fails with `NameError: name 'te_general_gemm' is not defined`
(`RouterGatingLinearFunction.forward`). With the name set to None the router takes its torch.mm
path, which the code already has. Remove when megatron-core defines the fallback itself.
"""

from megatron.core.transformer.moe import moe_utils

from megatron_patches._util import Undo

NAME = "moe_te_gemm"
CPU_ONLY = False
SUPPORTED = ">=0.16.1,<0.17"


def needed() -> bool:
    return not hasattr(moe_utils, "te_general_gemm")


def apply() -> Undo:
    if not needed():
        return lambda: None
    moe_utils.te_general_gemm = None
    return lambda: delattr(moe_utils, "te_general_gemm")
