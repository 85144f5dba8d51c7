"""Any device without Transformer Engine / Apex (torch Adam inside the distributed optimizer).

`DistributedOptimizer.load_state_dict` gives every parameter's Adam state the *same* `step`
tensor object. Torch Adam then increments that one tensor once per parameter at each step, so the
bias correction is wrong from the second step after a resume. Nothing errors: the resumed run
silently diverges from the uninterrupted one (seen: loss 4.889040 instead of 4.888571 at the second
resumed step). Fix: give each parameter its own copy of `step` after loading. Remove when
megatron-core clones the step tensor there.
"""

from megatron.core.optimizer import distrib_optimizer

from megatron_patches._util import Undo, swap, torch_adam_in_distopt

NAME = "distopt_shared_step"
CPU_ONLY = False
SUPPORTED = ">=0.16.1,<0.17"
applies = torch_adam_in_distopt

_original = distrib_optimizer.DistributedOptimizer.load_state_dict


def load_state_dict(self, state_dict):
    _original(self, state_dict)
    for state in self.optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()


def apply() -> Undo:
    return swap(distrib_optimizer.DistributedOptimizer, "load_state_dict", load_state_dict)
