"""The few helpers of CPython's ``test.support`` that the vendored tests use.

``test.support`` ships only with some Python builds (Debian splits it out), so the
vendored CPython tests import these instead; each mirrors the upstream helper's behaviour.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

SHORT_TIMEOUT = 30.0
LONG_TIMEOUT = 5 * 60.0
has_fork_support = hasattr(os, "fork")


def sleeping_retry(timeout: float, err_msg: str | None = None) -> Iterator[None]:
    """Yield until ``timeout`` passes, sleeping a little more each time; then fail."""
    delay = 0.001
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timeout ({timeout:.1f} seconds){': ' + err_msg if err_msg else ''}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def reap_children() -> None:
    """Reap any finished child process (as ``test.support.reap_children``)."""
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break


def gc_collect() -> None:
    import gc

    for _ in range(3):
        gc.collect()


class import_helper:
    @staticmethod
    def import_fresh_module(
        name: str,
        fresh: Sequence[str] = (),
        blocked: Sequence[str] = (),
    ) -> Any:
        """A fresh import of ``name``, with ``fresh`` modules imported anew too and the
        ``blocked`` ones made unimportable (``None`` when that import fails, as upstream).
        ``sys.modules`` is left as it was."""
        names = [name, *fresh, *blocked]
        saved = {n: sys.modules[n] for n in names if n in sys.modules}
        try:
            for n in names:
                sys.modules.pop(n, None)
            for n in blocked:
                sys.modules[n] = None  # type: ignore[assignment]
            try:
                for n in fresh:
                    importlib.import_module(n)
                return importlib.import_module(name)
            except ImportError:
                return None
        finally:
            for n in names:
                sys.modules.pop(n, None)
            sys.modules.update(saved)


class threading_helper:
    @staticmethod
    def requires_working_threading(*, module: bool = False) -> Any:
        """Threads always work where safeshm runs (Linux): nothing to skip."""
        if module:
            return None
        return lambda f: f

    @staticmethod
    def threading_setup() -> tuple[int]:
        return (threading.active_count(),)

    @staticmethod
    def threading_cleanup(*original: Any) -> None:
        deadline = time.monotonic() + SHORT_TIMEOUT
        while threading.active_count() > original[0] and time.monotonic() < deadline:
            time.sleep(0.01)

    @staticmethod
    @contextlib.contextmanager
    def wait_threads_exit(timeout: float = SHORT_TIMEOUT) -> Iterator[None]:
        before = threading.active_count()
        try:
            yield
        finally:
            deadline = time.monotonic() + timeout
            while threading.active_count() > before and time.monotonic() < deadline:
                time.sleep(0.01)

    @staticmethod
    def join_thread(thread: threading.Thread, timeout: float = SHORT_TIMEOUT) -> None:
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"failed to join the thread in {timeout:.1f} seconds")

    @staticmethod
    @contextlib.contextmanager
    def start_threads(threads: Any) -> Iterator[None]:
        threads = list(threads)
        for t in threads:
            t.start()
        try:
            yield
        finally:
            for t in threads:
                t.join(SHORT_TIMEOUT)


support = type(
    "support",
    (),
    {
        "SHORT_TIMEOUT": SHORT_TIMEOUT,
        "LONG_TIMEOUT": LONG_TIMEOUT,
        "has_fork_support": has_fork_support,
        "sleeping_retry": staticmethod(sleeping_retry),
        "reap_children": staticmethod(reap_children),
        "gc_collect": staticmethod(gc_collect),
    },
)
