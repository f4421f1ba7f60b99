"""``open_counter(url)`` and its siblings: the backend picked by the URL.

``shm://NAME`` opens the shared-memory structure named ``NAME`` on this machine;
``redis://HOST:PORT/DB#NAME`` (also ``rediss://`` and ``unix:///PATH?db=N#NAME``) opens
the Redis-backed one (``safeshm.redis``, extra ``safeshm[redis]``). A store lives in a
directory: ``file:///PATH`` (or ``shm:///PATH``) opens a :class:`~safeshm.SafeFileStore`
there. The result is typed as the structure's Protocol, so code written against it runs
on either backend, and a configuration change moves an application from one host to many::

    jobs = safeshm.open_queue(os.environ["JOBS_URL"], capacity=1 << 20)
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Literal, TypeVar, overload

from ._counter import SafeCounter
from ._lock import SafeLock
from ._protocols import SharedCounter, SharedLock, SharedQueue, SharedShardedCounter, SharedStore
from ._queue import SafeQueue
from ._segment import validate_name
from ._sharded import ShardedCounter
from ._store import SafeFileStore, Serializer

__all__ = ["open_counter", "open_lock", "open_queue", "open_store"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")
V = TypeVar("V")


def _scheme(url: object, what: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(url, str):
        raise TypeError(f"{what}() takes a URL str, not {type(url).__name__}")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in allowed:
        raise ValueError(
            f"{what}({url!r}): unknown URL scheme {scheme + '://' if scheme else '(none)'}; "
            f"expected one of {', '.join(s + '://' for s in allowed)}"
        )
    return scheme


def _shm_name(url: str) -> str:
    """The NAME of ``shm://NAME``: nothing else may be in the URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.path or parts.query or parts.fragment or not parts.netloc:
        raise ValueError(f"a shared-memory URL is shm://NAME, not {url!r}")
    return validate_name(parts.netloc)


def _redis() -> Any:
    try:
        from . import redis as backend  # noqa: PLC0415 - import safeshm never imports redis-py
    except ImportError as exc:
        raise ImportError("a redis:// URL needs redis-py: pip install 'safeshm[redis]'") from exc
    return backend


@overload
def open_counter(
    url: str, initial: int = 0, *, sharded: Literal[False] = False
) -> SharedCounter: ...
@overload
def open_counter(
    url: str, initial: int = 0, *, sharded: Literal[True], **options: Any
) -> SharedShardedCounter: ...
def open_counter(
    url: str, initial: int = 0, *, sharded: bool = False, **options: Any
) -> SharedCounter | SharedShardedCounter:
    """Open (create or attach) the counter at ``url``.

    ``shm://NAME``: :class:`~safeshm.SafeCounter` (``sharded=True``:
    :class:`~safeshm.ShardedCounter`). ``redis://...#NAME``:
    :class:`safeshm.redis.RedisCounter` (``sharded=True``: :class:`safeshm.redis.FleetCounter`,
    which counts in a local ``ShardedCounter`` and publishes each host's total; its options,
    such as ``flush_interval=``, are passed on). ``initial`` applies when the counter is
    created.
    """
    scheme = _scheme(url, "open_counter", ("shm", *_REDIS_SCHEMES))
    if scheme == "shm":
        if options:
            raise TypeError(f"open_counter(shm://...) takes no {', '.join(options)}")
        name = _shm_name(url)
        if sharded:
            return ShardedCounter.open(name, initial)
        return SafeCounter.open(name, initial)
    backend = _redis()
    if sharded:
        return backend.FleetCounter.open(url, initial, **options)  # type: ignore[no-any-return]
    if options:
        raise TypeError(f"open_counter() takes no {', '.join(options)} without sharded=True")
    return backend.RedisCounter.open(url, initial)  # type: ignore[no-any-return]


def open_lock(url: str, **options: Any) -> SharedLock:
    """Open the lock at ``url``: ``shm://NAME`` -> :class:`~safeshm.SafeLock`,
    ``redis://...#NAME`` -> :class:`safeshm.redis.RedisLock` (its options, such as
    ``lease=``, are passed on; a shared-memory lock takes none)."""
    scheme = _scheme(url, "open_lock", ("shm", *_REDIS_SCHEMES))
    if scheme == "shm":
        if options:
            raise TypeError(f"open_lock(shm://...) takes no {', '.join(options)}")
        return SafeLock.open(_shm_name(url))
    return _redis().RedisLock.open(url, **options)  # type: ignore[no-any-return]


@overload
def open_queue(
    url: str, capacity: int, *, raw: Literal[False] = False, **options: Any
) -> SharedQueue[Any]: ...
@overload
def open_queue(
    url: str, capacity: int, *, raw: Literal[True], **options: Any
) -> SharedQueue[bytes]: ...
def open_queue(url: str, capacity: int, *, raw: bool = False, **options: Any) -> SharedQueue[Any]:
    """Open the queue at ``url`` with ``capacity`` bytes: ``shm://NAME`` ->
    :class:`~safeshm.SafeQueue`, ``redis://...#NAME`` -> :class:`safeshm.redis.RedisQueue`.
    Other keyword options (``maxsize=``, ...) go to the backend's ``open()``."""
    scheme = _scheme(url, "open_queue", ("shm", *_REDIS_SCHEMES))
    if scheme == "shm":
        return SafeQueue.open(_shm_name(url), capacity, raw=raw, **options)
    return _redis().RedisQueue.open(url, capacity, raw=raw, **options)  # type: ignore[no-any-return]


@overload
def open_store(
    url: str, *, durable: bool = True, serializer: Literal["json", "pickle"] = "json"
) -> SharedStore[Any]: ...
@overload
def open_store(
    url: str, *, durable: bool = True, serializer: Literal["bytes"]
) -> SharedStore[bytes]: ...
@overload
def open_store(url: str, *, durable: bool = True, serializer: Serializer[V]) -> SharedStore[V]: ...
def open_store(
    url: str, *, durable: bool = True, serializer: str | Serializer[Any] = "json"
) -> SharedStore[Any]:
    """Open the store at ``url``: ``file:///PATH`` (or ``shm:///PATH``) ->
    :class:`~safeshm.SafeFileStore` in that directory, ``redis://...#NAME`` ->
    :class:`safeshm.redis.RedisStore`. ``durable=True`` means what each backend documents:
    fsync'd files, or a Redis server that has fsync'd the write (refused at open where the
    server cannot promise it)."""
    scheme = _scheme(url, "open_store", ("file", "shm", *_REDIS_SCHEMES))
    if scheme in ("file", "shm"):
        parts = urllib.parse.urlsplit(url)
        if (
            parts.query
            or parts.fragment
            or parts.netloc not in ("", "localhost")
            or not parts.path.startswith("/")
        ):
            raise ValueError(
                f"a store URL is file:///ABSOLUTE/PATH (three slashes), not {url!r}: a "
                "store is a directory, not a shared-memory name"
            )
        path = urllib.parse.unquote(parts.path)
        return SafeFileStore(path, durable=durable, serializer=serializer)  # type: ignore[arg-type]
    return _redis().RedisStore.open(url, durable=durable, serializer=serializer)  # type: ignore[no-any-return]
