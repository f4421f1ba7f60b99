"""The int64 range and the one check of an int64 argument, shared by the counters."""

from __future__ import annotations

import operator
from typing import Any, Final

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def check_int64(what: str, v: Any) -> int:
    """Validate an int64 argument the way the hot paths' memoryview stores do."""
    try:
        i = operator.index(v)  # int, bool, numpy integers; not float, not str
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(v).__name__}") from None
    if not INT64_MIN <= i <= INT64_MAX:
        raise OverflowError(f"{what} {i} is outside the int64 range; nothing was changed")
    return i
