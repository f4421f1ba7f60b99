"""A griffe extension for the API reference: show the doctest examples of safeshm's
docstrings as Python console code.

The docstrings keep plain doctest blocks (``>>> ...``) under an ``Example:`` heading,
which ``help()`` and editors show as they are. mkdocstrings renders ``Example:`` as an
admonition whose body is Markdown, where each ``>>>`` starts a triple-nested blockquote
and the lines run together into one paragraph. This wraps every doctest block (a run of
lines from a ``>>>`` line to the next blank line) in a ``pycon`` fence, and drops
``# doctest:`` directives, which mean nothing to a reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

_FENCE = re.compile(r"(`{3,}|~{3,})")
_DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """Every object defined in ``obj`` (aliases -- re-exports -- are visited where they
    are defined)."""
    for member in obj.members.values():
        if member.is_alias or not isinstance(member, griffe.Object):
            continue
        yield member
        if member.is_module or member.is_class:
            yield from _objects(member)


def fence_doctests(text: str) -> str:
    """``text`` with each doctest block fenced as ``pycon``; code already fenced is left
    alone."""
    lines = text.split("\n")
    out: list[str] = []
    open_fence: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if open_fence is not None:  # inside a Markdown code block of the docstring
            if stripped.startswith(open_fence):
                open_fence = None
            out.append(line)
            i += 1
        elif m := _FENCE.match(stripped):
            open_fence = m[1]
            out.append(line)
            i += 1
        elif stripped.startswith(">>>"):
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                out.append(_DIRECTIVE.sub("", lines[i]))
                i += 1
            out.append(f"{indent}```")
        else:
            out.append(line)
            i += 1
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fence the doctest blocks of every docstring in the package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None and ">>>" in obj.docstring.value:
                obj.docstring.value = fence_doctests(obj.docstring.value)
