"""safeshm: typed, process-safe shared data structures on shared memory.

Counters, arrays, queues and locks that any process of the same user can attach to by
name, that stay exact under any mix of processes and threads, and that survive workers
dying at the worst moment. See ``README.md`` for a tour and ``python -m safeshm --help``
for the CLI.
"""

from __future__ import annotations

# First: on an unsupported platform this raises a clear ImportError before anything else.
from . import _compat  # noqa: F401
from ._array import ArrayStatistics, SafeArray
from ._barrier import BarrierStatistics, SafeBarrier
from ._compat import implementation
from ._condition import ConditionStatistics, SafeCondition
from ._counter import CounterStatistics, SafeCounter
from ._errors import (
    BackendAuthenticationError,
    BackendUnavailableError,
    DurabilityError,
    HandleClosedError,
    HolderDiedWarning,
    IncompatibleKeyError,
    IncompatibleSegmentError,
    IncompatibleStoreError,
    InsecureDirectoryError,
    InvalidNameError,
    ItemDecodeError,
    LeaseExpiredError,
    LeaseLostError,
    LeaseTableFullError,
    LockedViewLeakedError,
    LockNotHeldError,
    LockReentryError,
    LockTimeoutError,
    OutcomeUnknownError,
    ProcessTableFullError,
    QueueShutDown,
    SafeShmError,
    SafeShmWarning,
    SegmentClosedError,
    SegmentCorruptedError,
    SegmentExistsError,
    SegmentNotFoundError,
    SegmentPermissionError,
    SerializerMismatchError,
    StoreClosedError,
    StoreCorruptedError,
    StoreNotFoundError,
    StoreTimeoutError,
    TickOverrunWarning,
    TooManyWaitersError,
    TransactionConflictError,
)
from ._event import EventStatistics, SafeEvent
from ._lock import LockStatistics, SafeLock
from ._open import open_counter, open_lock, open_queue, open_store
from ._protocols import (
    Guarantees,
    SharedCounter,
    SharedLock,
    SharedQueue,
    SharedShardedCounter,
    SharedStore,
)
from ._queue import Lease, QueueStatistics, SafeQueue
from ._rlock import RLockStatistics, SafeRLock
from ._rwlock import RWLockStatistics, SafeRWLock
from ._semaphore import SafeBoundedSemaphore, SafeSemaphore, SemaphoreStatistics
from ._sharded import ShardedCounter, ShardedCounterStatistics
from ._store import (
    DamagedRecord,
    RecoveryReport,
    SafeFileStore,
    Serializer,
    StoreStatistics,
    Transaction,
)
from ._tick import TickLeader, TickLeaderStatistics

__version__ = "0.1.0.dev0"

__all__ = [
    "ArrayStatistics",
    "BackendAuthenticationError",
    "BackendUnavailableError",
    "BarrierStatistics",
    "ConditionStatistics",
    "CounterStatistics",
    "DamagedRecord",
    "DurabilityError",
    "EventStatistics",
    "Guarantees",
    "HandleClosedError",
    "HolderDiedWarning",
    "IncompatibleKeyError",
    "IncompatibleSegmentError",
    "IncompatibleStoreError",
    "InsecureDirectoryError",
    "InvalidNameError",
    "ItemDecodeError",
    "Lease",
    "LeaseExpiredError",
    "LeaseLostError",
    "LeaseTableFullError",
    "LockNotHeldError",
    "LockReentryError",
    "LockStatistics",
    "LockTimeoutError",
    "LockedViewLeakedError",
    "OutcomeUnknownError",
    "ProcessTableFullError",
    "QueueShutDown",
    "QueueStatistics",
    "RLockStatistics",
    "RWLockStatistics",
    "RecoveryReport",
    "SafeArray",
    "SafeBarrier",
    "SafeBoundedSemaphore",
    "SafeCondition",
    "SafeCounter",
    "SafeEvent",
    "SafeFileStore",
    "SafeLock",
    "SafeQueue",
    "SafeRLock",
    "SafeRWLock",
    "SafeSemaphore",
    "SafeShmError",
    "SafeShmWarning",
    "SegmentClosedError",
    "SegmentCorruptedError",
    "SegmentExistsError",
    "SegmentNotFoundError",
    "SegmentPermissionError",
    "SemaphoreStatistics",
    "Serializer",
    "SerializerMismatchError",
    "ShardedCounter",
    "ShardedCounterStatistics",
    "SharedCounter",
    "SharedLock",
    "SharedQueue",
    "SharedShardedCounter",
    "SharedStore",
    "StoreClosedError",
    "StoreCorruptedError",
    "StoreNotFoundError",
    "StoreStatistics",
    "StoreTimeoutError",
    "TickLeader",
    "TickLeaderStatistics",
    "TickOverrunWarning",
    "TooManyWaitersError",
    "Transaction",
    "TransactionConflictError",
    "__version__",
    "implementation",
    "open_counter",
    "open_lock",
    "open_queue",
    "open_store",
]


def _adopt_public_classes() -> None:
    """Public classes (and functions) say ``safeshm.X`` in reprs, tracebacks, pickles and
    ``help()``, not ``safeshm._counter.X``: the private module layout stays private."""
    for name in __all__:
        obj = globals()[name]
        if callable(obj):  # the classes, and implementation()
            obj.__module__ = __name__


_adopt_public_classes()
del _adopt_public_classes
