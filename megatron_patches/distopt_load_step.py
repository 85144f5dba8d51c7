"""Any device without Transformer Engine / Apex (torch Adam inside the distributed optimizer).

Loading a distributed-optimizer checkpoint (`fully_reshardable` or `dp_reshardable`) ends in
`_set_main_param_and_optimizer_states`, which copies *every* key of the torch-Adam state from the
loaded tensors, `step` included, which the checkpoint keeps in the param groups, not per tensor:
`KeyError: 'step'`. On the `dp_reshardable` path the copy into the fp32 main parameter also fails:
`RuntimeError: a view of a leaf Variable that requires grad is being used in an in-place operation`.
Fix: the same copy under `no_grad`, skipping `step` (`load_state_dict` sets it from the param
groups). Remove when megatron-core skips `step` there.
"""

import torch
from megatron.core.optimizer import distrib_optimizer

from megatron_patches._util import Undo, swap, torch_adam_in_distopt

NAME = "distopt_load_step"
CPU_ONLY = False
SUPPORTED = ">=0.16.1,<0.17"
applies = torch_adam_in_distopt

_original = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _original(self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    state = self.optimizer.state[main_param]
    with torch.no_grad():
        main_param.copy_(tensors["param"])
        for key, dst in state.items():
            if key != "step":
                dst.copy_(tensors[key])


def apply() -> Undo:
    return swap(distrib_optimizer.DistributedOptimizer, "_set_main_param_and_optimizer_states",
                _set_main_param_and_optimizer_states)
