"""CPU only. megatron's `CudaRNGStatesTracker` keeps CUDA generator states: `add()` calls
`torch.cuda.get_rng_state()` and `fork()` swaps CUDA states. `model_parallel_cuda_manual_seed`
calls `add()`, and `DotProductAttention` enters `get_cuda_rng_tracker().fork()` on every forward.

Without it: `model_parallel_cuda_manual_seed(…)` fails with
`AssertionError: Torch not compiled with CUDA enabled` (from `torch.cuda.get_rng_state`).
Fix: a tracker with the same semantics over CPU generator states (on a CPU the dropout in a
forked region draws from the CPU generator, so that is the state to fork).
Remove when megatron-core has a device-agnostic RNG tracker.
"""

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom

from megatron_patches._util import Undo, chain, swap

NAME = "rng_tracker"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"


class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """`CudaRNGStatesTracker` whose named states are CPU generator states."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        g = torch.Generator()
        g.manual_seed(seed)
        self.states_[name] = g.get_state()

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def apply() -> Undo:
    def rebuild() -> None:
        # The tracker is a module global built once: rebuild it from the class now in place.
        mrandom.initialize_rng_tracker(force_reset=True)

    undo = swap(mrandom, "CudaRNGStatesTracker", CpuRNGStatesTracker)
    rebuild()
    return chain([rebuild, undo])  # undone in reverse: restore the class, then rebuild
