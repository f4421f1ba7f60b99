"""The library's own exceptions and warnings.

Every leaf also subclasses the builtin it resembles, so code that already catches
``ValueError``, ``RuntimeError``, ``TimeoutError`` or ``PermissionError`` keeps working.
All of them pickle (they carry only their message), so they cross process boundaries
in pools unchanged.
"""

from __future__ import annotations

import pickle
import queue
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BackendAuthenticationError",
    "BackendUnavailableError",
    "DurabilityError",
    "HandleClosedError",
    "HolderDiedWarning",
    "IncompatibleKeyError",
    "IncompatibleSegmentError",
    "IncompatibleStoreError",
    "InsecureDirectoryError",
    "InvalidNameError",
    "ItemDecodeError",
    "LeaseExpiredError",
    "LeaseLostError",
    "LeaseTableFullError",
    "LockNotHeldError",
    "LockReentryError",
    "LockTimeoutError",
    "LockedViewLeakedError",
    "OutcomeUnknownError",
    "ProcessTableFullError",
    "QueueShutDown",
    "SafeShmError",
    "SafeShmWarning",
    "SegmentClosedError",
    "SegmentCorruptedError",
    "SegmentExistsError",
    "SegmentNotFoundError",
    "SegmentPermissionError",
    "SerializerMismatchError",
    "StoreClosedError",
    "StoreCorruptedError",
    "StoreNotFoundError",
    "StoreTimeoutError",
    "TickOverrunWarning",
    "TooManyWaitersError",
    "TransactionConflictError",
]


class SafeShmError(Exception):
    """Base class of every error that safeshm raises itself."""


class HandleClosedError(SafeShmError, ValueError):
    """A handle (of a shared-memory structure or of a store) was used after ``close()``.

    The common base of :class:`SegmentClosedError` and :class:`StoreClosedError`, as
    trio's ``ClosedResourceError`` is for its resources: ``except HandleClosedError``
    catches use-after-close of anything safeshm hands out.
    """


class SegmentClosedError(HandleClosedError):
    """A shared-memory handle was used after ``close()``.

    Raised instead of touching unmapped memory: a closed handle never segfaults.
    """


class SegmentNotFoundError(SafeShmError, FileNotFoundError):
    """No safeshm segment has this name (``attach()``, ``inspect``, ``rm``).

    A :class:`FileNotFoundError` (``errno.ENOENT``), so code that already catches that keeps
    working, and a :class:`SafeShmError`, so ``except SafeShmError`` catches it too.
    """


class SegmentExistsError(SafeShmError, FileExistsError):
    """``create()`` was given a name that another segment already has.

    A :class:`FileExistsError` (``errno.EEXIST``) and a :class:`SafeShmError`.
    """


class IncompatibleSegmentError(SafeShmError, ValueError):
    """The segment exists but is not what the caller asked for.

    It holds another kind of structure, another layout version, different parameters
    (for ``open()``), or it is not a safeshm segment at all. The message names the
    segment, what was expected and what was found.
    """


class SegmentCorruptedError(IncompatibleSegmentError):
    """The segment is a safeshm segment of the expected kind, but what it holds is damaged:
    a value read from it breaks the structure's invariants (a size, a count, a position
    or a record that cannot be right, a mutex that is not a valid mutex any more).

    Raised instead of returning garbage or crashing; the message names the segment and
    what is wrong. Nothing is changed by the call that detects it. Shared memory is
    damaged only by a program writing into it (or by hand): remove the segment
    (``safeshm rm NAME``) and create it again.
    """


class InvalidNameError(SafeShmError, ValueError):
    """A segment name is not a short portable name (see ``safeshm`` naming rules)."""


class SegmentPermissionError(SafeShmError, PermissionError):
    """The segment belongs to another user or can be written by other users.

    safeshm segments are private to the user who created them (mode ``0600``);
    attaching to one that others could have written is refused.
    """


class LockReentryError(SafeShmError, RuntimeError):
    """The calling thread tried to acquire a lock it already holds.

    A ``SafeLock`` is not reentrant; acquiring it twice from one thread would deadlock
    forever, so it raises instead.
    """


class LockNotHeldError(SafeShmError, RuntimeError):
    """``release()`` was called by a thread that does not hold the lock."""


class LockTimeoutError(SafeShmError, TimeoutError):
    """A lock could not be acquired within the given timeout."""


class LeaseExpiredError(SafeShmError):
    """A :class:`~safeshm.Lease` was acknowledged after it had ended (it expired, or its
    item was released or acknowledged already): the item was, or will be, delivered
    again; the acknowledgement changed nothing."""


class LeaseTableFullError(SafeShmError, RuntimeError):
    """Every lease slot of a :class:`~safeshm.SafeQueue` is in use (see ``leases=``):
    the leased get took nothing."""


class ProcessTableFullError(SafeShmError, RuntimeError):
    """A synchronization primitive (SafeSemaphore, SafeBarrier, SafeRWLock...) keeps one
    record per process that uses it, to give back what a dead process held; every record
    is owned by a live process. Create the primitive with a larger ``processes=``."""


class TooManyWaitersError(SafeShmError, RuntimeError):
    """Every waiter slot of a :class:`~safeshm.SafeCondition` (256) is taken by a live
    waiter: one more ``wait()`` is refused instead of being left unnotifiable."""


class LockedViewLeakedError(SafeShmError, BufferError):
    """The view from ``SafeArray.locked()`` outlived its block (see ``locked()``)."""


class SafeShmWarning(UserWarning):
    """Base class of the warnings that safeshm issues."""


class HolderDiedWarning(SafeShmWarning, RuntimeWarning):
    """The previous holder of a lock died while holding it.

    The lock has been recovered and is now held by the caller. Whatever the dead
    holder was doing under the lock may be incomplete; safeshm's own structures are
    built so that they stay consistent, but data of your own that the lock guarded
    may need checking.
    """


class TickOverrunWarning(SafeShmWarning, RuntimeWarning):
    """A tick was skipped because a job has held the lead longer than ``max_run``.

    Issued by :meth:`TickLeader.lead` (and the loops) in the one caller that claimed the
    tick, so at most once per tick across all processes. The job may be hung, or its
    process stopped (``SIGSTOP``, a debugger, a frozen container): no tick runs until it
    ends or its process dies (the next tick then recovers the lead, with a
    :class:`~safeshm.HolderDiedWarning`). safeshm never takes the lead from a live holder.

    Attributes:
        name: the leader's name.
        tick: the tick that was skipped.
        holder_pid: the process running the overdue job (``None`` if it cannot be seen:
            another pid namespace, or it just ended).
        running_for: seconds the job had held the lead.
    """

    def __init__(
        self,
        message: str,
        name: str = "",
        tick: int = 0,
        holder_pid: int | None = None,
        running_for: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.tick = tick
        self.holder_pid = holder_pid
        self.running_for = running_for

    def __reduce__(self) -> tuple[Any, ...]:
        # The attributes travel with a pickled warning (a multiprocessing result, a log
        # record): the default keeps only the message.
        return (type(self), (str(self), self.name, self.tick, self.holder_pid, self.running_for))


if sys.version_info >= (3, 13):

    class QueueShutDown(SafeShmError, queue.ShutDown):
        """The queue was shut down (``SafeQueue.shutdown()``): ``put`` raises it at once,
        ``get`` once the queue is empty (at once after ``shutdown(immediate=True)``).

        Also a :class:`queue.ShutDown` on Python 3.13+, like the standard queues raise.
        """

else:

    class QueueShutDown(SafeShmError):
        """The queue was shut down (``SafeQueue.shutdown()``): ``put`` raises it at once,
        ``get`` once the queue is empty (at once after ``shutdown(immediate=True)``).

        Also a :class:`queue.ShutDown` on Python 3.13+, like the standard queues raise.
        """


class ItemDecodeError(SafeShmError, pickle.UnpicklingError):
    """Items taken from a ``SafeQueue`` could not be unpickled in this process (their class
    cannot be imported here, their ``__setstate__`` raised, ...).

    They are off the queue, but nothing is lost: ``items`` holds every item of the
    same ``get_many()`` batch that did unpickle, in queue order, ``undecodable`` the
    pickled bytes of each item that did not (for ``get()``: no items, one blob), and
    ``failed_at`` where each of those stood in the batch (so the order can be rebuilt).
    ``__cause__`` is the first failure -- whatever an unpickling raised, including an
    ``Exception`` from a signal handler that ran meanwhile. Also a
    :class:`pickle.UnpicklingError`.
    """

    def __init__(
        self,
        message: str,
        items: Sequence[Any] = (),
        undecodable: Sequence[bytes] = (),
        failed_at: Sequence[int] = (),
    ) -> None:
        super().__init__(message)
        self.items: list[Any] = list(items)
        self.undecodable: list[bytes] = list(undecodable)
        self.failed_at: list[int] = list(failed_at)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.items, self.undecodable, self.failed_at))


class StoreCorruptedError(SafeShmError, ValueError):
    """A ``SafeFileStore``'s files do not check out: a checksum does not match, or the
    structure is damaged (a flipped byte, a file truncated in its middle or its header,
    a file changed by another program).

    Never raised for the half-written last record of a writer that was killed: that is
    discarded silently, as the write never completed.
    """


class IncompatibleStoreError(SafeShmError, ValueError):
    """The directory holds something other than what was asked for: a store written with
    another serializer or in another format, or files that are not a store at all."""


class InsecureDirectoryError(SafeShmError, PermissionError):
    """A store's directory or file belongs to another user or can be written by others,
    or one of the store's files is a symbolic link: other users could change the data.

    Also raised for the shared-memory segment directory (``SAFESHM_DIR``, ``/dev/shm``)
    when it belongs to another user (not root) or others can write into it without the
    sticky bit: they could then replace or remove our segments."""


class StoreNotFoundError(SafeShmError, FileNotFoundError):
    """There is no ``SafeFileStore`` at this path (``create=False``, ``recover``,
    ``safeshm store check``/``dump``). A :class:`FileNotFoundError` and a
    :class:`SafeShmError`."""


class StoreTimeoutError(LockTimeoutError):
    """A ``SafeFileStore`` write could not take the store's write lock within its timeout
    (another writer holds it: busy, stopped or stuck). Nothing was written."""


class StoreClosedError(HandleClosedError):
    """A ``SafeFileStore`` handle was used after ``close()``, or a transaction outside its
    ``with`` block."""


# Remote backends (safeshm.redis): outcomes that only happen over a network.


class BackendUnavailableError(SafeShmError, ConnectionError):
    """The server could not be reached (connection refused or timed out while connecting,
    still loading its data after a restart): the operation was **not** applied.

    A :class:`ConnectionError`. Retrying it is safe; the next call reconnects by itself.
    """


class BackendAuthenticationError(BackendUnavailableError, PermissionError):
    """The server refused the credentials (wrong password or user, or no permission for
    the command). Nothing was applied. Also a :class:`PermissionError`."""


class OutcomeUnknownError(SafeShmError, ConnectionError):
    """The connection dropped (or the reply timed out) after a write was sent: it may or
    may not have been applied, and no automatic retry was made, so it is applied at
    most once.

    Only a remote backend raises it, and only for writes that are not idempotent
    (``add()``, ``put()``, ``get()`` ...); reads and idempotent writes are retried once
    instead. What the caller does next depends on what it wrote: re-read the state, or
    accept that the write happened zero or one time. A :class:`ConnectionError`.
    """


class LeaseLostError(SafeShmError, RuntimeError):
    """A remote lock's lease ended before the holder released it: it expired (the holder
    was paused or cut off longer than the lease, or renewing failed), and another
    process may have acquired the lock since. What the holder did after the lease ended
    was not protected by the lock; the fencing token it got tells a resource that checks
    tokens to refuse its late writes."""


class IncompatibleKeyError(IncompatibleSegmentError):
    """A remote backend's key under this name holds something else: another kind of
    safeshm structure, a structure created with other parameters, or data that safeshm
    did not write (a Redis key of another type). Nothing was changed. An
    :class:`IncompatibleSegmentError`, as for a shared-memory segment of another kind."""


class DurabilityError(SafeShmError, RuntimeError):
    """``durable=True`` cannot be honoured: the server does not fsync a write before it
    replies (``appendonly``/``appendfsync always`` missing, ``CONFIG`` unavailable to
    check it, and no ``WAITAOF`` before Redis 7.2), or a write was applied but the server
    did not confirm its fsync. Raised at ``open()`` rather than silently writing less
    durably; open with ``durable=False`` to accept that a server crash may lose the last
    writes."""


class TransactionConflictError(SafeShmError, RuntimeError):
    """A remote store's transaction read a key that another writer changed before it
    committed: nothing of the transaction was written. Run the block again (it reads
    the new values)."""


class SerializerMismatchError(IncompatibleStoreError, IncompatibleKeyError):
    """The store was created with another serializer. An :class:`IncompatibleStoreError`
    (what ``SafeFileStore`` raises for the same mismatch) and an
    :class:`IncompatibleKeyError` (what every Redis structure raises for other
    parameters)."""
