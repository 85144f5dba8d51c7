"""Helpers shared by the patch modules: reversible attribute swaps and the version guard."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

Undo = Callable[[], None]


def megatron_version() -> Version:
    return Version(version("megatron-core"))


def check_version(name: str, supported: str) -> None:
    found = megatron_version()
    if found not in SpecifierSet(supported):
        raise RuntimeError(
            f"megatron_patches.{name} was written for megatron-core {supported}, found {found}: "
            f"check whether the bug it fixes is still there, then update or delete the patch"
        )


def torch_adam_in_distopt() -> bool:
    """The distributed optimizer wraps torch's Adam (no Transformer Engine / Apex FusedAdam):
    where the distopt_* checkpoint patches apply."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def swap(obj: object, attr: str, new: object) -> Undo:
    """setattr(obj, attr, new) and return a function that puts the old value back."""
    missing = object()
    old = getattr(obj, attr, missing)
    setattr(obj, attr, new)

    def undo() -> None:
        if old is missing:
            delattr(obj, attr)
        else:
            setattr(obj, attr, old)

    return undo


def chain(undos: list[Undo]) -> Undo:
    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo
