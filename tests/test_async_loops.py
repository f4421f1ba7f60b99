"""No loop inside a ``with`` or a ``try`` whose exit releases something (gh-130279).

On 3.13 an exception from a signal handler -- a ``KeyboardInterrupt``, a timeout -- that
lands at a loop's back edge can leave the frame without running the enclosing ``with``'s
``__exit__`` or the ``finally``: CPython's compiler may place that ``JUMP_BACKWARD`` outside
the enclosing exception range (CPython gh-130279). A ``for`` loop under ``with
self._mutex:`` in ``SafeFileStore``'s compaction leaked the store's mutex that way, and the
next write hung forever. ``tests/test_async_bytecode.py`` looks for such gaps in the
bytecode that the running Python makes, but which loops get a gap depends on the loop's
shape and on the compiler's version, and that scan misses some shapes. This rule is
stricter and the same on every Python: no loop (``for``, ``while``, or a list, set or dict
comprehension, which PEP 709 inlines into the frame from 3.12) runs in the body of a
``with`` or of a ``try`` that has a ``finally`` or an ``except`` that catches what a signal
handler raises. Such a loop goes in a function of its own: an exception raised in a callee
reaches the caller at the call, which the ``with`` or the ``try`` covers.

The benchmark programs (``safeshm._bench``) are left out: their timed loops stay inline, as
a user's hot loop would be written, and an interrupted benchmark is a process that ends.
"""

from __future__ import annotations

import ast
from pathlib import Path

import safeshm

# What a signal handler raises is a BaseException that is no Exception: only an `except`
# naming one of these (or a bare one) runs for it.
_ASYNC_NAMES = {"BaseException", "KeyboardInterrupt", "SystemExit"}
_LOOPS = (ast.For, ast.AsyncFor, ast.While, ast.ListComp, ast.SetComp, ast.DictComp)
# Their bodies run in frames of their own.
_OWN_FRAMES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.GeneratorExp)


def _catches_async(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = {t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types}
    return bool(_ASYNC_NAMES & names)


def _protected_body(node: ast.AST) -> list[ast.stmt]:
    """The statements whose interruption runs ``node``'s cleanup, if it has any."""
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return node.body
    if isinstance(node, (ast.Try, ast.TryStar)) and (
        node.finalbody or any(_catches_async(h) for h in node.handlers)
    ):
        return node.body
    return []


def _loops_in(statements: list[ast.stmt]) -> list[int]:
    found: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _OWN_FRAMES):
            return
        if isinstance(node, _LOOPS):
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in statements:
        visit(statement)
    return found


def loops_under_cleanup(source: str) -> list[tuple[int, int]]:
    """``(loop line, with/try line)`` of each loop that runs inside a cleanup's body."""
    return sorted(
        (loop, node.lineno)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.stmt)
        for loop in _loops_in(_protected_body(node))
    )


def test_the_rule_finds_the_shapes() -> None:
    """The shapes that leaked on 3.13.0 (among them three that the bytecode scan misses),
    and the shapes that are fine."""
    flagged = """
def compaction(self):
    with self._mutex:
        records = []
        for key in self._index:
            records.append(key)

def last_in_try(dir_fd):
    try:
        while dir_fd:
            dir_fd = step(dir_fd)
    finally:
        close(dir_fd)

def whole_with_body(self):
    with self._mutex:
        try:
            for x in self._xs:
                use(x)
        except ValueError:
            pass

def after_a_narrower_except(self):
    try:
        if self._x:
            total = sum([x for x in self._xs])
    except OSError as e:
        report(e)
    except BaseException:
        release()
        raise

def async_with():
    async def f(lock):
        async with lock:
            return {k: v for k, v in items()}
"""
    assert [loop for loop, _ in loops_under_cleanup(flagged)] == [5, 10, 18, 26, 36]
    fine = """
def fine(self):
    with self._mutex:
        records = _records(self)
        total = sum(x for x in self._xs)
        key = lambda r: [c for c in r]
        def inner():
            for x in self._xs:
                use(x)
    try:
        for x in self._xs:
            use(x)
    except (ValueError, OSError):
        pass
    try:
        pass
    finally:
        for x in self._xs:
            close(x)
    for x in self._xs:
        with self._mutex:
            use(x)
"""
    assert loops_under_cleanup(fine) == []


def test_no_loop_runs_inside_a_cleanup() -> None:
    package = Path(safeshm.__file__).parent
    problems = [
        f"{path.relative_to(package.parent)}:{loop} (in the with/try at line {at})"
        for path in sorted(package.rglob("*.py"))
        if "_bench" not in path.relative_to(package).parts
        for loop, at in loops_under_cleanup(path.read_text(encoding="utf-8"))
    ]
    assert not problems, (
        "a signal handler's exception at these loops' back edges can skip the enclosing "
        "with/finally on 3.13 (move each loop into a function of its own):\n" + "\n".join(problems)
    )
