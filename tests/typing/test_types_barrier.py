"""SafeBarrier's types as users see them, checked by ``mypy --strict`` (not run by pytest)."""

from __future__ import annotations

import contextlib
import threading
from typing import assert_type

from safeshm._barrier import BarrierStatistics, SafeBarrier


def barriers() -> None:
    b = SafeBarrier.create(3)
    assert_type(b, SafeBarrier)
    assert_type(SafeBarrier.create(2, lambda: None, 1.5, name="b", processes=4), SafeBarrier)
    assert_type(SafeBarrier.attach("b"), SafeBarrier)
    assert_type(SafeBarrier.attach("b", action=print, timeout=2), SafeBarrier)
    assert_type(SafeBarrier.open("b", 3), SafeBarrier)
    assert_type(SafeBarrier.open("b", 3, None, 1.0, processes=8), SafeBarrier)
    assert_type(b.wait(), int)
    assert_type(b.wait(0.5), int)
    assert_type(b.parties, int)
    assert_type(b.n_waiting, int)
    assert_type(b.broken, bool)
    assert_type(b.reset(), None)
    assert_type(b.abort(), None)
    assert_type(b.statistics(), BarrierStatistics)
    assert_type(b.statistics().generations, int)
    assert_type(b.name, str)
    with b as same:
        assert_type(same, SafeBarrier)
    with contextlib.suppress(threading.BrokenBarrierError):
        b.wait(1.0)
    b.close()
    b.unlink()
