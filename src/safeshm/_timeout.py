"""One validator for every ``timeout=`` argument.

Every blocking call checks its timeout here, before it does anything, so a bad value gets
the same error and message whatever the structure, and nothing happens first.
"""

from __future__ import annotations

import math
import numbers
import threading
import time


def check_timeout(timeout: object) -> float | None:
    """``timeout`` as seconds: ``None`` (wait forever) or a float ``>= 0`` (``inf`` also
    means forever, and so does anything from ``threading.TIMEOUT_MAX`` -- about 292
    years -- up, which no clock or system call could represent).

    Raises:
        TypeError: not a real number (``bool`` is refused: ``acquire(False)``-style
            mistakes must not read as a timeout of 0 seconds) and not ``None``.
        ValueError: negative or NaN.
    """
    if timeout is None:
        return None
    if (
        type(timeout) is not float
        and type(timeout) is not int  # the fast path
        and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real))
    ):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__}"
        )
    seconds = float(timeout)
    if not seconds >= 0:  # also NaN
        raise ValueError(
            f"timeout must be a non-negative number of seconds or None, got {timeout!r}"
        )
    return seconds if seconds < threading.TIMEOUT_MAX else math.inf


def deadline(timeout: float | None) -> float:
    """The ``time.monotonic()`` instant a checked timeout ends at (``inf``: never)."""
    return math.inf if timeout is None else time.monotonic() + timeout


def check_lock_timeout(timeout: object) -> float | None:
    """:func:`check_timeout` for the ``acquire()`` of a lock, as
    :meth:`threading.Lock.acquire` takes it: a timeout beyond ``threading.TIMEOUT_MAX``
    (about 292 years) is an ``OverflowError`` there, not "forever" (CPython's own lock
    tests check it), so code ported from threading sees the same error.

    Raises:
        OverflowError: beyond ``threading.TIMEOUT_MAX``.
        TypeError, ValueError: as :func:`check_timeout`.
    """
    seconds = check_timeout(timeout)
    if seconds == math.inf and float(timeout) > threading.TIMEOUT_MAX:  # type: ignore[arg-type]
        raise OverflowError("timeout value is too large")
    return seconds
