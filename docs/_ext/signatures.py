"""A griffe extension for the API reference: no private names in signatures.

A parameter that is optional without a meaningful default (``store.pop(key[,
default])``, ``store.modify(key, fn[, default])``) defaults to a private sentinel,
``_MISSING``, which means nothing to a reader and is not importable. The reference
shows such a default as ``...``, the convention of typeshed's stubs for "optional".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import griffe

_PRIVATE_SENTINELS = {"_MISSING"}


def _functions(obj: griffe.Object) -> Iterator[griffe.Function]:
    """Every function and method defined in ``obj`` (aliases are skipped: the object
    they point to is visited where it is defined)."""
    for member in obj.members.values():
        if member.is_alias or not isinstance(member, griffe.Object):
            continue
        if isinstance(member, griffe.Function):
            yield member
            yield from (o for o in member.overloads or () if isinstance(o, griffe.Function))
        elif member.is_module or member.is_class:
            yield from _functions(member)


class PrivateDefaults(griffe.Extension):
    """Show a private sentinel default as ``...``."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for function in _functions(pkg):
            for parameter in function.parameters:
                if str(parameter.default) in _PRIVATE_SENTINELS:
                    parameter.default = "..."
