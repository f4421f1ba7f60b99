"""The public surface: names, reprs, pickling, errors, typing marker."""

from __future__ import annotations

import pickle
from importlib import resources
from typing import Any

import pytest

import safeshm

from ._helpers import STRUCTURES, create


def test_all_is_the_documented_surface() -> None:
    assert safeshm.__all__ == sorted(safeshm.__all__)
    assert set(safeshm.__all__) == {
        # Backends by URL (docs/redis.md).
        "Guarantees",
        "SharedCounter",
        "SharedLock",
        "SharedQueue",
        "SharedShardedCounter",
        "SharedStore",
        "open_counter",
        "open_lock",
        "open_queue",
        "open_store",
        "BackendAuthenticationError",
        "BackendUnavailableError",
        "DurabilityError",
        "IncompatibleKeyError",
        "LeaseLostError",
        "OutcomeUnknownError",
        "SerializerMismatchError",
        "TransactionConflictError",
        "ArrayStatistics",
        "CounterStatistics",
        "DamagedRecord",
        "HandleClosedError",
        "HolderDiedWarning",
        "IncompatibleSegmentError",
        "IncompatibleStoreError",
        "InsecureDirectoryError",
        "InvalidNameError",
        "ItemDecodeError",
        "LockNotHeldError",
        "LockReentryError",
        "LockStatistics",
        "LockTimeoutError",
        "LockedViewLeakedError",
        "QueueShutDown",
        "LeaseTableFullError",
        "LeaseExpiredError",
        "Lease",
        "TooManyWaitersError",
        "RWLockStatistics",
        "SafeRWLock",
        "ConditionStatistics",
        "SafeCondition",
        "RLockStatistics",
        "SafeRLock",
        "ProcessTableFullError",
        "BarrierStatistics",
        "SafeBarrier",
        "SemaphoreStatistics",
        "SafeBoundedSemaphore",
        "SafeSemaphore",
        "EventStatistics",
        "SafeEvent",
        "QueueStatistics",
        "RecoveryReport",
        "SafeArray",
        "SafeCounter",
        "SafeFileStore",
        "SafeLock",
        "SafeQueue",
        "SafeShmError",
        "SafeShmWarning",
        "SegmentClosedError",
        "SegmentCorruptedError",
        "SegmentExistsError",
        "SegmentNotFoundError",
        "SegmentPermissionError",
        "Serializer",
        "ShardedCounter",
        "ShardedCounterStatistics",
        "StoreClosedError",
        "StoreCorruptedError",
        "StoreNotFoundError",
        "StoreStatistics",
        "StoreTimeoutError",
        "Transaction",
        # One job per tick across workers (docs/how-to/one-job-per-tick.md).
        "TickLeader",
        "TickLeaderStatistics",
        "TickOverrunWarning",
        "__version__",
        "implementation",
    }
    for name in safeshm.__all__:
        assert hasattr(safeshm, name)


@pytest.mark.parametrize("name", [n for n in safeshm.__all__ if n != "__version__"])
def test_public_objects_live_in_the_facade(name: str) -> None:
    obj = getattr(safeshm, name)
    assert obj.__module__ == "safeshm"


def test_py_typed_is_shipped() -> None:
    assert resources.files("safeshm").joinpath("py.typed").is_file()


@pytest.mark.parametrize("cls", STRUCTURES)
def test_direct_construction_points_to_classmethods(cls: Any) -> None:
    with pytest.raises(TypeError, match=r"create\(\)"):
        cls()


def test_error_hierarchy() -> None:
    assert issubclass(safeshm.SegmentClosedError, safeshm.SafeShmError)
    assert issubclass(safeshm.SegmentClosedError, ValueError)
    assert issubclass(safeshm.IncompatibleSegmentError, ValueError)
    assert issubclass(safeshm.InvalidNameError, ValueError)
    assert issubclass(safeshm.SegmentPermissionError, PermissionError)
    assert issubclass(safeshm.LockReentryError, RuntimeError)
    assert issubclass(safeshm.LockNotHeldError, RuntimeError)
    assert issubclass(safeshm.LockTimeoutError, TimeoutError)
    assert issubclass(safeshm.HolderDiedWarning, safeshm.SafeShmWarning)
    assert issubclass(safeshm.HolderDiedWarning, RuntimeWarning)
    # One closed-handle base for everything safeshm hands out (trio's ClosedResourceError).
    assert issubclass(safeshm.SegmentClosedError, safeshm.HandleClosedError)
    assert issubclass(safeshm.StoreClosedError, safeshm.HandleClosedError)
    assert issubclass(safeshm.SegmentNotFoundError, FileNotFoundError)
    assert issubclass(safeshm.SegmentExistsError, FileExistsError)
    assert issubclass(safeshm.StoreTimeoutError, safeshm.LockTimeoutError)
    assert issubclass(safeshm.LockedViewLeakedError, BufferError)
    for name in safeshm.__all__:
        obj = getattr(safeshm, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, safeshm.SafeShmError), name


def _every_error_class() -> list[type[BaseException]]:
    from safeshm import _errors

    classes = {getattr(safeshm, n) for n in safeshm.__all__} | {
        getattr(_errors, n) for n in _errors.__all__
    }
    return sorted(
        (c for c in classes if isinstance(c, type) and issubclass(c, BaseException)),
        key=lambda c: c.__name__,
    )


def _instance(cls: type[BaseException]) -> BaseException:
    if issubclass(cls, OSError):
        return cls(2, "segment 'a' is missing", "/dev/shm/safeshm.a")
    return cls("segment 'a': something")


def test_every_error_lives_in_errors_module() -> None:
    from safeshm import _errors

    for cls in _every_error_class():
        assert cls.__name__ in _errors.__all__, cls


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_errors_pickle(cls: type[BaseException]) -> None:
    exc = _instance(cls)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc)
    assert str(again) == str(exc)
    assert pickle.dumps(exc).find(b"safeshm._errors") == -1


@pytest.mark.parametrize("cls", STRUCTURES)
def test_repr_open_and_closed(cls: Any, cleanup: Any) -> None:
    h = cleanup(create(cls))
    r = repr(h)
    assert r.startswith(f"safeshm.{cls.__name__}(name={h.name!r}")
    h.close()
    assert repr(h) == f"safeshm.{cls.__name__}(name={h.name!r}, closed=True)"


@pytest.mark.parametrize("cls", STRUCTURES)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_handles_pickle_by_reference(cls: Any, protocol: int, cleanup: Any) -> None:
    h = cleanup(create(cls))
    data = pickle.dumps(h, protocol=protocol)
    assert b"safeshm._" not in data  # references safeshm.X, not private modules
    assert len(data) < 200  # a name, not the segment's contents
    again = pickle.loads(data)
    try:
        assert type(again) is cls
        assert again.name == h.name
    finally:
        again.close()


def test_pickled_handle_shares_state(cleanup: Any) -> None:
    c = cleanup(safeshm.SafeCounter.create(7))
    d = pickle.loads(pickle.dumps(c))
    try:
        d.add(3)
        assert c.value == 10
    finally:
        d.close()


@pytest.mark.parametrize("cls", STRUCTURES)
def test_pickling_a_closed_handle_is_an_error(cls: Any, cleanup: Any) -> None:
    h = cleanup(create(cls))
    h.close()
    with pytest.raises(safeshm.SegmentClosedError):
        pickle.dumps(h)


def test_version() -> None:
    assert isinstance(safeshm.__version__, str)


@pytest.mark.parametrize("platform", ["darwin", "win32", "freebsd14"])
def test_unsupported_platform_fails_clearly_at_import(platform: str) -> None:
    import subprocess
    import sys

    code = f"import sys; sys.platform = {platform!r}; import safeshm"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert "ImportError: safeshm supports Linux only" in proc.stderr
    assert platform in proc.stderr


@pytest.mark.parametrize("huge", [1e300, 2**70, float("inf")])
def test_a_timeout_beyond_any_clock_means_forever(huge: float, tmp_path: Any) -> None:
    from safeshm._timeout import check_timeout

    assert check_timeout(huge) == float("inf")
    store = safeshm.SafeFileStore(tmp_path / "s", timeout=huge)
    try:
        store["a"] = 1
        assert store.modify("a", lambda v: v + 1, timeout=huge) == 2
    finally:
        store.close()
    with safeshm.SafeQueue.create(4096) as q:
        q.put(1, timeout=huge)
        assert q.get(timeout=huge) == 1
    lock = safeshm.SafeLock.create()
    try:
        # Except a lock's acquire(), which takes its timeout as threading.Lock does:
        # beyond threading.TIMEOUT_MAX, OverflowError (CPython's own lock tests check it).
        with pytest.raises(OverflowError):
            lock.acquire(timeout=huge)
        assert not lock.locked()
    finally:
        lock.close()
        lock.unlink()
