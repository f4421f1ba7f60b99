"""safeshm's structures on Redis (or Valkey), through redis-py: extra ``safeshm[redis]``.

The same typed interfaces as the shared-memory classes (``safeshm.SharedCounter``,
``SharedLock``, ``SharedQueue``, ``SharedStore``, ``SharedShardedCounter``), for processes
on many machines. Open them by URL, ``redis://HOST:PORT/DB#NAME`` (the fragment is the
structure's name), directly or through ``safeshm.open_counter(url)`` and its siblings.
See ``docs/redis.md`` for what each promises and where it differs from shared memory.
"""

from __future__ import annotations

try:
    import redis as _redis_py  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the pure install check
    raise ImportError("safeshm.redis needs redis-py: pip install 'safeshm[redis]'") from exc

from safeshm.redis._counter import FleetCounter, RedisCounter
from safeshm.redis._lock import RedisLock
from safeshm.redis._queue import RedisLease, RedisQueue, RedisQueueStatistics
from safeshm.redis._store import RedisStore, RedisTransaction

__all__ = [
    "FleetCounter",
    "RedisCounter",
    "RedisLease",
    "RedisLock",
    "RedisQueue",
    "RedisQueueStatistics",
    "RedisStore",
    "RedisTransaction",
]


def _adopt_public_classes() -> None:
    """Public classes say ``safeshm.redis.X`` in reprs, tracebacks and ``help()``."""
    for name in __all__:
        globals()[name].__module__ = __name__


_adopt_public_classes()
del _adopt_public_classes
