"""CPU only. `MoEAlltoAllTokenDispatcher.__init__` creates `torch.cuda.Stream()` for its
device-to-host copies and later uses `torch.cuda.current_stream()` / `torch.cuda.stream(…)`.

Without it, building an MoE model with the alltoall dispatcher fails with
`RuntimeError: torch.cuda.Stream requires CUDA support` (or, on the CPU wheel, the
"Torch not compiled with CUDA enabled" assertion).
Fix: an inert stream object and `current_stream` / `stream` stand-ins when CUDA is absent (CPU ops
are synchronous, so there is nothing to order). Remove when the dispatcher checks for CUDA.
"""

import contextlib

import torch

from megatron_patches._util import Undo, chain, swap

NAME = "cuda_streams"
CPU_ONLY = True
SUPPORTED = ">=0.16.1,<0.17"


class InertEvent:
    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class InertStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or InertEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other) -> bool:
        return isinstance(other, InertStream)

    def __hash__(self) -> int:
        return 0


_STREAM = InertStream()


def apply() -> Undo:
    return chain([
        swap(torch.cuda, "Stream", InertStream),
        swap(torch.cuda, "current_stream", lambda device=None: _STREAM),
        swap(torch.cuda, "default_stream", lambda device=None: _STREAM),
        swap(torch.cuda, "stream", lambda s=None: contextlib.nullcontext()),
        swap(torch.cuda, "Event", lambda *a, **k: InertEvent()),
    ])
