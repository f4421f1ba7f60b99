"""Rate limits shared by every worker process, for the ``limits`` library (and with it
flask-limiter and slowapi): a storage on shared memory, registered as ``shm://NAME``.

Importing this module registers the schemes ``shm`` and ``async+shm``::

    import safeshm.ratelimit  # noqa: F401 - registers shm://
    from limits.storage import storage_from_string

    storage = storage_from_string("shm://myapp.limits?keys=65536")

Every process that names the same table shares it: limits hold exactly across gunicorn
or uvicorn workers on one machine, with no server to run. Query options (or keyword
options of ``storage_from_string`` / flask-limiter's ``storage_options``) set the
capacity when the table is created: ``keys`` (live keys at once, default 4096),
``key_bytes`` (longest key stored as it is, default 256; longer ones are stored by a
digest) and ``entries`` (moving-window capacity in acquisitions still in their window,
default 65536); ``lock_timeout`` (seconds, default 5) bounds each operation's wait for
the table's lock. See :class:`RateLimitTable`.

The storages need ``limits`` (``pip install 'safeshm[limits]'``): without it, importing
this module still works (and registers nothing), :class:`RateLimitTable` is usable, and
the storage classes raise ``ImportError`` naming the extra.
"""

from __future__ import annotations

from typing import Any

from ._table import (
    RateLimitStatistics,
    RateLimitTable,
    RateLimitTableFullError,
)

__all__ = [
    "AsyncSharedMemoryStorage",
    "RateLimitStatistics",
    "RateLimitTable",
    "RateLimitTableFullError",
    "SharedMemoryStorage",
]

try:
    from ._storage import AsyncSharedMemoryStorage, SharedMemoryStorage
except ImportError as _e:
    _missing: ImportError | None = _e

    def __getattr__(attr: str) -> Any:
        if attr in ("SharedMemoryStorage", "AsyncSharedMemoryStorage"):
            raise ImportError(str(_missing)) from _missing
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
