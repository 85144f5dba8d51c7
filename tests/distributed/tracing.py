"""Tracers for a block of code: which process groups it talks on, which parallel_state it reads.

The teacher-isolation test needs every collective and every ``parallel_state`` call the teacher
makes. Patching ``torch.distributed.all_reduce`` alone misses some: megatron-core binds
collectives at import time under other names (``dist_all_gather_func`` /
``dist_reduce_scatter_func`` = ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, or the
``_base`` variants, in tensor_parallel/{mappings,layers,utils}.py, distributed/
param_and_grad_buffer.py, transformer/multi_token_prediction.py, timers.py and utils.py), and
modules that did ``from megatron.core.parallel_state import get_x`` hold their own reference. So
every attribute of an already-imported megatron / megatron_patches / qwen3kd module that *is* a
patched function (by identity, whatever its name) is swapped too, and put back on exit.

Wrappers only record, then call through. Nesting works: an inner tracer wraps the outer
wrappers (which the aliases then hold) and unwinds first. ``torch.distributed.distributed_c10d``
is left alone, so a collective torch builds from another (all_gather_object -> all_gather) is
recorded once, under the name that was called. torch checks P2POp ops by identity
(``op in [isend, irecv]``, ``op.op is isend``), so while tracing P2POp accepts the wrappers and
stores the real function: ``P2POp(dist.isend, ...)`` keeps working and batch_isend_irecv is
recorded per op, not again as isend/irecv.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce all_gather all_gather_into_tensor _all_gather_base reduce_scatter "
    "reduce_scatter_tensor _reduce_scatter_base all_to_all all_to_all_single broadcast send recv "
    "isend irecv batch_isend_irecv barrier all_gather_object broadcast_object_list gather scatter "
    "reduce"
).split()
_PACKAGES = ("megatron", "megatron_patches", "qwen3kd")


def _loaded_modules() -> list[object]:
    return [
        m
        for name, m in list(sys.modules.items())
        if m is not None and name.split(".")[0] in _PACKAGES
    ]


def _unwrap(fn: object) -> object:
    while getattr(fn, "_traced", False):
        fn = fn.__wrapped__
    return fn


@contextmanager
def _patched(home: object, names: list[str], wrap: Callable) -> Iterator[None]:
    """Swap home.<name> and every alias of that object in loaded modules for wrap(name, fn)."""
    by_id = {id(fn): (fn, wrap(name, fn)) for name in names if (fn := getattr(home, name, None))}
    done = []
    for mod in [home, *_loaded_modules()]:
        for attr, value in list(getattr(mod, "__dict__", {}).items()):
            hit = by_id.get(id(value))
            if hit is not None and hit[0] is value:
                setattr(mod, attr, hit[1])
                done.append((mod, attr, value, hit[1]))
    try:
        yield
    finally:
        for mod, attr, value, wrapper in reversed(done):
            if getattr(mod, attr, None) is wrapper:  # leave alone what someone else re-swapped
                setattr(mod, attr, value)


@contextmanager
def trace_collectives() -> Iterator[list[tuple[str, dist.ProcessGroup | None]]]:
    """Yield a list that gets ``(op_name, group)`` per torch.distributed call in the block.

    ``group`` is the object passed (positionally or as ``group=``), None for the default group;
    batch_isend_irecv adds one record per P2POp, with that op's group.
    """
    records: list[tuple[str, dist.ProcessGroup | None]] = []
    c10d = dist.distributed_c10d

    def record(name: str, group: dist.ProcessGroup | None) -> None:
        records.append((name, None if group is dist.group.WORLD else group))

    def wrap(name: str, fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                arguments = sig.bind(*args, **kwargs).arguments
            except TypeError:  # a bad call: let the real function raise its own error
                return fn(*args, **kwargs)
            if name == "batch_isend_irecv":
                for op in arguments["p2p_op_list"]:
                    record(name, op.group)
            else:
                record(name, arguments.get("group"))
            return fn(*args, **kwargs)

        wrapper._traced = True
        return wrapper

    def real_op_init(_: str, init: Callable) -> Callable:
        @functools.wraps(init)
        def __init__(self, op, *args, **kwargs):
            init(self, _unwrap(op), *args, **kwargs)

        return __init__

    with (
        _patched(dist, COLLECTIVES, wrap),
        _patched(c10d, ["_check_op"], lambda _, check: lambda op: check(_unwrap(op))),
        _patched(c10d.P2POp, ["__init__"], real_op_init),
    ):
        yield records


@contextmanager
def trace_parallel_state(include_internal: bool = False) -> Iterator[Counter[str]]:
    """Yield a Counter of the megatron.core.parallel_state functions called in the block.

    By default only calls from outside parallel_state count (get_tensor_model_parallel_rank, not
    the get_tensor_model_parallel_group it calls itself); include_internal=True counts all.
    """
    from megatron.core import parallel_state as ps

    calls: Counter[str] = Counter()
    depth = threading.local()
    names = [
        n for n, v in vars(ps).items() if inspect.isfunction(v) and v.__module__ == ps.__name__
    ]

    def wrap(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            level = getattr(depth, "level", 0)
            if include_internal or level == 0:
                calls[name] += 1
            depth.level = level + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.level = level

        return wrapper

    with _patched(ps, names, wrap):
        yield calls
