"""Helpers for the safeshm.metrics tests: forked children with timeouts, exposition."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from safeshm.metrics import MetricsRegistry

WAIT = 30.0


def fork(fn: Callable[[], Any]) -> int:
    """Run ``fn`` in a forked child that exits with 0 (or 1 if ``fn`` raised) without
    any cleanup: like a worker killed at the end of its work."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = WAIT) -> int:
    """Wait for ``pid`` (killing it after ``timeout``); its exit status or -signal."""
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        time.sleep(0.002)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    reap(pid)


def values(reg: MetricsRegistry) -> dict[tuple[str, tuple[str, ...]], list[float]]:
    """``{(metric name, label values): cells}`` of every exported series."""
    return {(d.name, labels): cells for d, samples in reg.snapshot() for labels, cells in samples}


def value(reg: MetricsRegistry, name: str, labels: tuple[str, ...] = ()) -> float:
    return values(reg)[(name, labels)][0]


def wait_until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def pipe_wait(fd: int, timeout: float = WAIT) -> bytes:
    import select

    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        raise AssertionError("no message from the child in time")
    return os.read(fd, 64)


def chunks(n: int, k: int) -> Iterator[int]:
    for i in range(k):
        yield n // k + (1 if i < n % k else 0)
