"""No loop back edge escapes a ``with``'s ``__exit__`` or a ``finally`` (issue 10.3, on 3.13).

CPython checks for signals at a loop's back edge (``JUMP_BACKWARD``), and from 3.13 it does
so before the jump, at the ``JUMP_BACKWARD`` itself. Its compiler sometimes places that
instruction outside the exception-table range of the ``with`` or ``try`` that encloses the
loop (CPython gh-130279): an exception from a signal handler landing there -- a
``KeyboardInterrupt``, a timeout -- leaves the frame without running ``__exit__`` or the
``finally``. A ``with self._mutex:`` around a ``for`` loop in ``SafeFileStore``'s
compaction leaked the store's mutex that way: the next write hung forever (seen as a hang of
``test_many_interrupts_leave_no_mutex_held[store-raise]`` on 3.13.0, about 1 run in 45).

This test reads the bytecode of every module of safeshm as the running Python compiles it
and fails on each back edge that lies in such a gap; the fix is to move the loop into a
function of its own, whose call is covered. A signal storm finds such a gap only by luck.
The scan misses some shapes that leak (a loop as the last statement of the body, among
others): ``tests/test_async_loops.py`` holds the stricter rule, on every Python, that no
loop runs in such a body at all; this test shows the mechanism in the bytecode.
"""

from __future__ import annotations

import dis
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import safeshm

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 13),
    reason="before 3.13 a back edge checks for signals after jumping, so the exception is "
    "raised at the loop's head, inside the enclosing range (the shapes that leak on 3.13.0 "
    "did not leak on 3.11.7 or 3.12.1 under about 20,000 interrupts each)",
)

# Exceptions from signal handlers are BaseExceptions: an `except` that names only
# Exception subclasses would not catch them anyway, so skipping it changes nothing.
_ASYNC_NAMES = {"BaseException", "KeyboardInterrupt", "SystemExit"}


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


# Handlers that run nothing of ours: restoring the exception being handled, an inlined
# comprehension restoring its variable, `except ... as e` unbinding e.
_HARMLESS = (
    ["COPY", "POP_EXCEPT", "RERAISE"],
    ["SWAP", "POP_TOP", "SWAP", "STORE_FAST"],
    ["LOAD_CONST", "STORE_FAST", "DELETE_FAST", "RERAISE"],
)


def _runs_cleanup(handler: list[dis.Instruction]) -> bool:
    """Does this exception handler run code of ours for an async exception: a ``with``'s
    ``__exit__``, a ``finally``, a bare ``except`` or one naming ``BaseException``? Not:
    the handlers in _HARMLESS, a generator's StopIteration wrapper, and ``except`` clauses
    naming only Exception subclasses."""
    ops = [i.opname for i in handler[:4]]
    if any(ops[: len(prefix)] == prefix for prefix in _HARMLESS) or any(
        i.opname == "CALL_INTRINSIC_1" and "STOPITERATION" in i.argrepr for i in handler[:3]
    ):
        return False
    names: list[str] = []
    matched = False  # an `except` clause was seen
    for i in handler[1:]:
        if i.opname == "WITH_EXCEPT_START":
            return True
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR"):
            names.append(str(i.argval))
        elif i.opname == "CHECK_EXC_MATCH":
            if _ASYNC_NAMES & set(names):
                return True
            names, matched = [], True
        elif i.opname == "RERAISE":
            break
    return not matched  # a finally or a bare except


def unprotected_back_edges(code: types.CodeType) -> list[int]:
    """Lines of the back edges of ``code`` (itself, not nested functions) that lie between
    two ranges of one exception handler that runs cleanup, yet in neither."""
    instructions = list(dis.get_instructions(code))
    entries = list(dis._parse_exception_table(code))  # type: ignore[attr-defined]
    # From 3.12 handlers are laid out after all the other code: a range of the handler
    # region that follows a back edge of the body says nothing about the body.
    handlers_from = min((e.target for e in entries), default=0)
    lines = []
    for ins in instructions:
        if ins.opname != "JUMP_BACKWARD":
            continue
        if any(e.start <= ins.offset < e.end for e in entries):
            continue
        limit = handlers_from if ins.offset < handlers_from else math.inf
        around = {e.target for e in entries if e.end <= ins.offset} & {
            e.target for e in entries if ins.offset < e.start < limit
        }
        for target in around:
            if _runs_cleanup([i for i in instructions if i.offset >= target]):
                lines.append((ins.positions.lineno if ins.positions else None) or -1)
                break
    return lines


def _modules() -> Iterator[tuple[str, Path]]:
    # Every file, not pkgutil.walk_packages: that skips a package it cannot import
    # (safeshm.redis without redis-py).
    package = Path(safeshm.__file__).parent
    for path in sorted(package.rglob("*.py")):
        yield ".".join(path.relative_to(package.parent).with_suffix("").parts), path


def test_the_scan_finds_the_gap_that_leaked_the_store_mutex() -> None:
    """The scan itself, on the shape that leaked (``_Log._compact_locked`` before the fix),
    and on the fixed shape: the loop in a function of its own."""
    source = """
def leaks(self, names):
    with self._mutex:
        for name in names:
            stale = name is not None and name > 3
            if stale or name.endswith(".tmp"):
                self.unlink(name)
        self.write()

def fixed(self, names):
    with self._mutex:
        _unlink_stale(self, names)
        self.write()
"""
    module = compile(source, "<shapes>", "exec")
    found = {c.co_name: unprotected_back_edges(c) for c in _code_objects(module)}
    assert found["leaks"] == [6]
    assert found["fixed"] == []


def test_no_back_edge_escapes_a_cleanup() -> None:
    problems = []
    for name, path in _modules():
        module = compile(path.read_text(encoding="utf-8"), str(path), "exec")
        for code in _code_objects(module):
            lines = unprotected_back_edges(code)
            if lines:
                problems.append(f"{name}: {code.co_qualname}, the loop ending at line(s) {lines}")
    assert not problems, (
        "a signal handler's exception at these loops' back edges skips the enclosing "
        "with/finally (move each loop into a function of its own):\n" + "\n".join(problems)
    )
