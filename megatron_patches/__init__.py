"""Explicit, version-guarded patches to megatron-core 0.16.x.

Each module is one patch: its docstring says what fails without it (the exact error) and when it
can go. `apply_all()` is called by the entry point before any model or optimizer is built: the
CPU-only patches only where CUDA is absent, the bug fixes wherever the bug applies (a module's
optional `applies()` says whether it does here, e.g. only without Transformer Engine / Apex). Every patch
returns an undo, so tests can show each one is needed.
"""

from __future__ import annotations

import importlib
import logging

import torch

from megatron_patches._util import Undo, check_version

log = logging.getLogger(__name__)

# Order matters only for the TorchFunctionModes (cuda_literal wraps type_str).
PATCHES = (
    "current_device",
    "rng_tracker",
    "cuda_literal",
    "type_str",
    "cuda_sync",
    "cuda_streams",
    "a2a_splits",
    "moe_te_gemm",
    "sp_norm",
    "moe_aux_loss_sp",
    "distopt_fresh_state",
    "distopt_load_step",
    "distopt_shared_step",
)

_applied: list[tuple[str, Undo]] = []


def apply_all(cpu: bool | None = None, skip: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Apply every patch that applies here (idempotent). Returns the names applied now."""
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    unknown = set(skip) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown megatron patch(es): {sorted(unknown)}; known: {PATCHES}")
    done = {name for name, _ in _applied}
    now = []
    for name in PATCHES:
        if name in skip or name in done:
            continue
        mod = importlib.import_module(f"megatron_patches.{name}")
        if (mod.CPU_ONLY and not cpu) or not getattr(mod, "applies", lambda: True)():
            continue
        check_version(name, mod.SUPPORTED)
        _applied.append((name, mod.apply()))
        now.append(name)
    if now:
        log.debug("megatron patches applied: %s", ", ".join(now))
    return now


def undo_all() -> None:
    while _applied:
        _, undo = _applied.pop()
        undo()


def applied() -> list[str]:
    return [name for name, _ in _applied]
