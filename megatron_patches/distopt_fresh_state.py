"""Any device without Transformer Engine / Apex (torch Adam inside the distributed optimizer).

Resuming with the distributed optimizer builds the loading state dict on a *fresh* optimizer:
`DistributedOptimizer.sharded_state_dict(is_loading=True)` calls `state_dict()`, which reads the
Adam `step` out of the per-parameter state, which torch Adam has not allocated yet:
`AssertionError` at `assert len(steps) == 1` (steps is empty).
Fix: with no per-parameter state yet, report step 0 (no step was taken) instead of asserting.
Remove when megatron-core handles an unallocated torch-Adam state in `state_dict()`.
"""

from megatron.core.optimizer import distrib_optimizer

from megatron_patches._util import Undo, swap, torch_adam_in_distopt

NAME = "distopt_fresh_state"
CPU_ONLY = False
SUPPORTED = ">=0.16.1,<0.17"
applies = torch_adam_in_distopt

_original = distrib_optimizer.DistributedOptimizer.state_dict


def state_dict(self):
    if self.optimizer.state:
        return _original(self)
    inner = self.optimizer.state_dict()
    out = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
    for group in out["optimizer"]["param_groups"]:
        del group["params"]
        group["step"] = 0
    if self.grad_scaler:
        out["grad_scaler"] = self.grad_scaler.state_dict()
    return out


def apply() -> Undo:
    return swap(distrib_optimizer.DistributedOptimizer, "state_dict", state_dict)
