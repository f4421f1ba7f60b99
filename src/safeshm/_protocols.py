"""One ``typing.Protocol`` per structure, satisfied by every backend.

Application code typed against these runs unchanged on shared memory (``SafeCounter``,
``SafeLock``, ``SafeQueue``, ``SafeFileStore``, ``ShardedCounter``) and on Redis
(``safeshm.redis``): ``mypy --strict`` checks both, and ``safeshm.open_counter(url)``
and its siblings return these types, the backend picked by the URL.

They hold the operations whose meaning is the same everywhere. What differs between
backends (how a dead holder is detected, what survives a crash, which errors only a
network can cause) is in each class's ``guarantees`` (:class:`Guarantees`) and in the
docs' table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractContextManager
from typing import Final, Literal, Protocol, Self, TypeVar, overload, runtime_checkable

__all__ = [
    "Guarantees",
    "SharedCounter",
    "SharedLock",
    "SharedQueue",
    "SharedShardedCounter",
    "SharedStore",
]

T = TypeVar("T")
V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class Guarantees:
    """What a backend promises, as data: ``type(x).guarantees`` or ``x.guarantees``.

    Attributes:
        backend: ``"shm"`` (this machine's shared memory or disk) or ``"redis"``.
        scope: ``"host"`` (processes of one machine) or ``"network"`` (any machine that
            reaches the server).
        holder_death: how a lock holder's (or a consumer's) death is detected:
            ``"immediate"`` (the kernel knows the process died) or ``"lease"`` (its lease
            ran out; the old holder may still be running, paused or cut off).
        outcome_unknown: whether a write can end in :class:`~safeshm.OutcomeUnknownError`
            (a connection dropped after the write was sent).
        survives: what keeps acknowledged writes: ``"reboot"`` (fsync'd files),
            ``"host"`` (shared memory: until the machine restarts), ``"server-crash"``
            (Redis with ``appendfsync always`` or ``WAITAOF``), or ``"server-memory"``
            (a server restart may lose the last writes).
        exact: whether every acknowledged write is applied exactly once (``False`` where
            an unknown outcome or a fleet flush interval makes it at most once or stale).
    """

    backend: Literal["shm", "redis"]
    scope: Literal["host", "network"]
    holder_death: Literal["immediate", "lease", "n/a"]
    outcome_unknown: bool
    survives: Literal["reboot", "host", "server-crash", "server-memory"]
    exact: bool = True


SHM_GUARANTEES: Final = Guarantees(
    backend="shm", scope="host", holder_death="immediate", outcome_unknown=False, survives="host"
)
STORE_DURABLE: Final = Guarantees(
    backend="shm", scope="host", holder_death="immediate", outcome_unknown=False, survives="reboot"
)
STORE_NOT_DURABLE: Final = dataclasses.replace(STORE_DURABLE, survives="host")


@runtime_checkable
class SharedCounter(Protocol):
    """A signed 64-bit integer, exact under any mix of writers (``SafeCounter``,
    ``safeshm.redis.RedisCounter``). Leaving the int64 range raises ``OverflowError`` and
    changes nothing."""

    @property
    def name(self) -> str: ...
    @property
    def guarantees(self) -> Guarantees: ...
    @property
    def value(self) -> int: ...
    def add(self, delta: int = 1) -> int: ...
    def set(self, value: int) -> None: ...
    def exchange(self, value: int) -> int: ...
    def compare_and_set(self, expected: int, new: int) -> bool: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...


@runtime_checkable
class SharedShardedCounter(Protocol):
    """A write-heavy counter whose adds scale (``ShardedCounter``, and the fleet counter
    ``safeshm.redis.FleetCounter``): ``add()`` returns nothing, ``value`` sums the shards
    (on a fleet: as of each host's last flush)."""

    @property
    def name(self) -> str: ...
    @property
    def guarantees(self) -> Guarantees: ...
    @property
    def value(self) -> int: ...
    def add(self, delta: int = 1) -> None: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...


@runtime_checkable
class SharedLock(Protocol):
    """A named mutex shared by processes (``SafeLock``, ``safeshm.redis.RedisLock``), with
    ``threading.Lock``'s signature. ``with lock:`` acquires and releases."""

    @property
    def name(self) -> str: ...
    @property
    def guarantees(self) -> Guarantees: ...
    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool: ...
    def release(self) -> None: ...
    def locked(self) -> bool: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...


@runtime_checkable
class SharedQueue(Protocol[T]):
    """A bounded FIFO shared by processes (``SafeQueue``, ``safeshm.redis.RedisQueue``);
    ``queue.Empty`` and ``queue.Full`` as the standard queues raise them."""

    @property
    def name(self) -> str: ...
    @property
    def guarantees(self) -> Guarantees: ...
    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None: ...
    def put_nowait(self, item: T) -> None: ...
    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> T: ...
    def get_nowait(self) -> T: ...
    def get_many(
        self, max_items: int, block: bool = True, timeout: float | None = None
    ) -> list[T]: ...
    def qsize(self) -> int: ...
    def empty(self) -> bool: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...


@runtime_checkable
class SharedStore(Protocol[V]):
    """A key-value store shared by processes (``SafeFileStore``,
    ``safeshm.redis.RedisStore``): the core of a ``MutableMapping[str, V]``, an atomic
    read-modify-write (``modify``) and multi-key transactions (``with s.transaction() as
    tx:``, all of it or none)."""

    def __getitem__(self, key: str) -> V: ...
    def __setitem__(self, key: str, value: V) -> None: ...
    def __delitem__(self, key: str) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    @overload
    def get(self, key: str, /) -> V | None: ...
    @overload
    def get(self, key: str, default: V, /) -> V: ...
    @overload
    def get(self, key: str, default: T, /) -> V | T: ...
    @property
    def durable(self) -> bool: ...
    @property
    def guarantees(self) -> Guarantees: ...
    @overload
    def modify(self, key: str, fn: Callable[[V], V]) -> V: ...
    @overload
    def modify(self, key: str, fn: Callable[[V], V], default: V) -> V: ...
    def transaction(self) -> AbstractContextManager[MutableMapping[str, V]]: ...
    def to_dict(self) -> dict[str, V]: ...
    def close(self) -> None: ...
