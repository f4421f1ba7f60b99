"""A griffe extension for the API reference: render the Sphinx roles in safeshm's
docstrings (``:class:`~safeshm.SafeLock```, ``:meth:`add```) as mkdocstrings
cross-references.

The docstrings keep Sphinx roles because they are read with ``help()`` and in editors
too; mkdocstrings would print them literally. A role whose target is part of safeshm's
public surface becomes a link (``mkdocs build --strict`` then fails if the target is not
documented); any other target (the standard library: ``array``, ``queue.Full``) becomes
plain code, since the docs build reaches no external inventory.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|meth|attr|mod|func|data|exc|obj):`(~?)([^`]+)`")


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """Every object defined in ``obj`` (aliases -- re-exports -- are skipped: the
    object they point to is visited where it is defined)."""
    for member in obj.members.values():
        if member.is_alias or not isinstance(member, griffe.Object):
            continue
        yield member
        if member.is_module or member.is_class:
            yield from _objects(member)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        public = {str(name) for name in pkg.exports or ()}
        for obj in _objects(pkg):
            if obj.docstring is None:
                continue
            context = obj if obj.is_class else obj.parent
            cls = context if context is not None and context.is_class else None
            obj.docstring.value = _ROLE.sub(
                functools.partial(self._replace, package=pkg.name, public=public, cls=cls),
                obj.docstring.value,
            )

    @staticmethod
    def _replace(
        match: re.Match[str], *, package: str, public: set[str], cls: griffe.Object | None
    ) -> str:
        role, tilde, target = match.groups()
        label = target.rsplit(".", 1)[-1] if tilde else target
        if role in ("meth", "func"):
            label += "()"
        identifier: str | None = None
        head = target.split(".", 1)[0]
        if target.startswith(package + "."):
            if target[len(package) + 1 :].split(".", 1)[0] in public:
                identifier = target
        elif (
            "." not in target
            and cls is not None
            and cls.name in public
            and target in cls.all_members
        ):
            identifier = f"{package}.{cls.name}.{target}"
        elif head in public:
            identifier = f"{package}.{target}"
        if identifier is None:
            return f"`{label}`"
        return f"[`{label}`][{identifier}]"
