"""SafeRWLock's types as users see them, checked by ``mypy --strict`` (not run by pytest)."""

from __future__ import annotations

from typing import assert_type

from safeshm._rwlock import RWLockHold, RWLockStatistics, SafeRWLock


def rwlock() -> None:
    rw = SafeRWLock.create()
    assert_type(rw, SafeRWLock)
    assert_type(SafeRWLock.create(name="table", processes=8), SafeRWLock)
    assert_type(SafeRWLock.attach("table"), SafeRWLock)
    assert_type(SafeRWLock.open("table"), SafeRWLock)
    assert_type(SafeRWLock.open("table", processes=8), SafeRWLock)
    assert_type(rw.acquire_read(), bool)
    assert_type(rw.acquire_read(False), bool)
    assert_type(rw.acquire_read(timeout=1.0), bool)
    assert_type(rw.release_read(), None)
    assert_type(rw.acquire_write(True, 2), bool)
    assert_type(rw.release_write(), None)
    assert_type(rw.read(), RWLockHold)
    assert_type(rw.write(1.5), RWLockHold)
    with rw.read() as r:
        assert_type(r, SafeRWLock)
    with rw.write(timeout=None) as w:
        assert_type(w, SafeRWLock)
    with rw as same:
        assert_type(same, SafeRWLock)
    s = rw.statistics()
    assert_type(s, RWLockStatistics)
    assert_type(s.readers, int)
    assert_type(s.readers_by_pid, dict[int, int])
    assert_type(s.writer_pid, int | None)
    assert_type(s.writer_tid, int | None)
    assert_type(s.waiting_writers, int)
    assert_type(s.recoveries, int)
    assert_type(rw.name, str)
    rw.close()
    rw.unlink()
