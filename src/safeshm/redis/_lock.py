"""RedisLock: a lease lock on one Redis server, with fencing tokens and renewal.

Keys of the lock ``NAME`` (one hash tag, so one Cluster slot):

* ``safeshm:{NAME}:lease`` -- the holder's token, with a ``PX`` expiry (the lease);
* ``safeshm:{NAME}:state`` -- no expiry: ``H <token> <fence> <previous>`` while held,
  ``R <token>`` after a release, ``L <token>`` after a release that came too late. A
  ``H`` state without a lease key means the holder's lease ran out without a release:
  the next acquirer is told (``HolderDiedWarning``). The tokens in it also make every
  script safe to send again after a dropped connection (see below);
* ``safeshm:{NAME}:fence`` -- the fencing counter, ``INCR``'d by every acquire;
* the channel ``safeshm:{NAME}:released`` (not a key), on which releases are published.

Why pub/sub rather than a wake-up list that waiters ``BLPOP``: a list needs exactly one
pushed wake-up per waiter, and a woken waiter that then times out or dies takes its
wake-up with it (the others sleep on until the lease's end); a publish wakes every
waiter, and a message missed while a waiter is not yet subscribed cannot matter because
a waiter subscribes *before* its next attempt: a release after the subscription is
heard, one before it left the lock free for that attempt. Waiters also wake when the
lease would run out (the attempt returns its ``PTTL``), which is how a dead holder's
lock is taken over without any release.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import numbers
import os
import re
import secrets
import socket
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Final, Self

import redis.exceptions as rex

from safeshm._errors import (
    BackendUnavailableError,
    HolderDiedWarning,
    IncompatibleKeyError,
    LeaseLostError,
    LockNotHeldError,
    LockReentryError,
    LockTimeoutError,
    OutcomeUnknownError,
    SafeShmError,
)
from safeshm._lock import GeneratorHold
from safeshm._protocols import Guarantees
from safeshm._timeout import check_lock_timeout
from safeshm.redis._core import Connection, RedisStructure, _redact

__all__ = ["RedisLock"]

_NEVER: Final = math.inf
_MIN_LEASE: Final = 0.001  # PX counts milliseconds
_MAX_LEASE: Final = 1e9  # about 31 years: any longer is a mistake, not a lease
_RETRY_SLICE: Final = 0.5
"""Longest pause between two tries of a renewal or a background release that failed
because the server could not be reached (a tenth of the lease when that is shorter)."""
_CONFIRM_WAIT: Final = 10.0
"""How long a waiter waits for the server to confirm its SUBSCRIBE (redis-py's socket
timeout for every other reply)."""
_IDLE_EXIT: Final = 60.0
"""A handle's renewal thread ends after this long with nothing to do (and starts again
with the next hold)."""
_CUT_SHORT: Final = (OSError, ValueError, RuntimeError, AttributeError)
"""What redis-py's pub/sub raises, besides its own errors, when its socket is closed
under a blocked read (``ValueError: I/O operation on closed file``)."""
_MAX_DROPS: Final = 3
"""Subscriber connections a waiter may see drop in a row before it gives up."""

# -- scripts ------------------------------------------------------------------------------------
# KEYS: lease, state, fence. ARGV: token, lease in ms.
# Returns {1, fence, previous holder's token or '-'} (acquired; the previous token when its
# lease ran out without a release) or {0, holder's token, PTTL of its lease in ms}.
# Sent again with the same token (after a dropped connection) it returns the first
# execution's result instead of refusing: the token already holds the lease.
_ACQUIRE: Final = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
    local st = redis.call('GET', KEYS[2])
    local fence, prev
    if st then fence, prev = string.match(st, '^H %S+ (%d+) (%S+)$') end
    if not fence then fence = redis.call('GET', KEYS[3]) end
    return {1, tonumber(fence), prev or '-'}
end
if cur then
    return {0, cur, redis.call('PTTL', KEYS[1])}
end
local st = redis.call('GET', KEYS[2])
local prev = '-'
if st and string.sub(st, 1, 2) == 'H ' then
    prev = string.match(st, '^H (%S+)') or '?'
end
local fence = redis.call('INCR', KEYS[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], 'H ' .. ARGV[1] .. ' ' .. fence .. ' ' .. prev)
return {1, fence, prev}
"""

# KEYS: lease, state. ARGV: token, channel.
# 1: released (or released already by an earlier send of this call); 2: the lease had run
# out and nobody acquired the lock since (now free; the state says so, so the next
# acquirer is not told of a death); 0: another holder acquired it since (or it was
# unlinked): nothing changed.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('SET', KEYS[2], 'R ' .. ARGV[1])
    redis.call('PUBLISH', ARGV[2], 'released')
    return 1
end
local st = redis.call('GET', KEYS[2])
if st == 'R ' .. ARGV[1] then return 1 end
if st == 'L ' .. ARGV[1] then return 2 end
if st and string.find(st, 'H ' .. ARGV[1] .. ' ', 1, true) == 1 then
    redis.call('SET', KEYS[2], 'L ' .. ARGV[1])
    redis.call('PUBLISH', ARGV[2], 'released')
    return 2
end
return 0
"""

# KEYS: lease. ARGV: token, lease in ms. 1: extended; 0: not ours any more.
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
return 0
"""

# KEYS: the kind key, then keys that must be strings. 'ok', or what is wrong.
_CHECK_TYPES: Final = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'hash' then
    return 'the key ' .. KEYS[1] .. ' holds a Redis ' .. t .. ', not a safeshm structure'
end
for i = 2, #KEYS do
    t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= 'none' and t ~= 'string' then
        return 'the key ' .. KEYS[i] .. ' holds a Redis ' .. t .. ', not a RedisLock part'
    end
end
return 'ok'
"""

# -- who holds it ---------------------------------------------------------------------------
# A token is "HOST:PID:PROCESS-NONCE:THREAD-SERIAL:RANDOM". Everything up to the thread
# serial names the acquiring thread: an attempt that finds the lock held by a token of the
# calling thread (through another handle) is a re-entry, which would wait forever. The
# nonce changes in a forked child (its pid alone could be reused by a later process, and
# a child's thread must not pass for its parent's). Host and pid are for people reading
# the key with redis-cli, and for the HolderDiedWarning's message.
_HOST: Final = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
_process_nonce = [secrets.token_hex(4)]
_serials = itertools.count(1)
_thread_ids = threading.local()


def _new_process_nonce() -> None:
    _process_nonce[0] = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_process_nonce)


_held_tokens: set[str] = set()
"""Tokens this process's threads hold now (through any handle): an attempt that finds
the lock held by one of the calling thread's is a re-entry. (Not merely a token of the
calling thread: one whose release is still being retried in the background is no longer
held, and waiting for it is right.)"""


def _thread_identity() -> str:
    """``HOST:PID:NONCE:SERIAL:``, the calling thread's prefix of every token it uses."""
    found: tuple[str, str] | None = getattr(_thread_ids, "ident", None)
    nonce = _process_nonce[0]
    if found is None or found[0] != nonce:
        found = (nonce, f"{_HOST}:{os.getpid()}:{nonce}:{next(_serials)}:")
        _thread_ids.ident = found
    return found[1]


def _who(token: str) -> str:
    """``pid N on HOST`` for a token, in messages."""
    host, _, rest = token.partition(":")
    pid = rest.partition(":")[0]
    return f"pid {pid} on {host}" if pid.isdigit() else repr(token)


_PACKAGE_DIR: Final = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONTEXTLIB: Final = contextlib.__file__


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called right here: the first frame outside
    safeshm (and ``contextlib``, for ``acquired()``), so a warning names the user's line."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PACKAGE_DIR + os.sep) or name == _CONTEXTLIB):
            break
        frame = frame.f_back
        level += 1
    return level


def _check_lease(lease: object) -> float:
    if isinstance(lease, bool) or not isinstance(lease, numbers.Real):
        raise TypeError(f"lease must be a number of seconds, not {type(lease).__name__}")
    seconds = float(lease)
    if not _MIN_LEASE <= seconds <= _MAX_LEASE:  # also NaN
        raise ValueError(
            f"lease must be between {_MIN_LEASE} and {_MAX_LEASE:g} seconds, got {lease!r}"
        )
    return seconds


def _retry_after(lease: float) -> float:
    return max(0.005, min(lease / 10, _RETRY_SLICE))


@dataclasses.dataclass(eq=False)
class _Hold:
    """One thread's hold of the lock through one handle."""

    token: str
    fence: int
    thread: threading.Thread
    lease: float
    expires: float
    """``time.monotonic()`` by which the lease surely ends unless renewed: counted from
    when the acquire or the last successful extension was *sent* (the server started
    the lease later), so it never claims more than the server gives."""
    due: float
    """When the renewal thread next acts on it."""
    lost: str | None = None
    """Why the lease is known to be lost (``None``: not known to be)."""
    releasing: bool = False
    """A release that did not reach the server, retried in the background."""


@dataclasses.dataclass(eq=False)
class _State:
    """A handle's per-process state (a forked child starts a fresh one: the parent's
    holds are not the child's)."""

    pid: int
    cond: threading.Condition
    holds: dict[threading.Thread, _Hold]
    jobs: set[_Hold]  # holds the renewal thread renews, or releases in the background
    local: threading.local  # per thread: its subscriber connection
    pubsubs: list[Any]
    worker: threading.Thread | None = None
    wake_at: float = -_NEVER  # when the worker's sleep ends; -inf: it is not asleep
    stopped: bool = False


class RedisLock(RedisStructure):
    """A named mutex on a Redis server, for processes on any machine: a lease lock.

    The same interface as :class:`~safeshm.SafeLock` (``acquire(blocking=True,
    timeout=-1)`` with :class:`threading.Lock`'s rules, ``release()``, ``locked()``,
    ``with lock:``); both satisfy :class:`safeshm.SharedLock`. The lock is owned by the
    acquiring thread: acquiring it again from that thread (through any handle) raises
    :class:`~safeshm.LockReentryError`, and only that thread may release it.

    **A lease, not a kernel's word.** Holding the lock means holding a Redis key that
    expires ``lease`` seconds after it was last renewed. While a thread holds it, a
    background thread of the handle renews it every ``lease / 3`` seconds (unless
    ``renew=False``: then call :meth:`extend` yourself). If the holding process dies, is
    paused, or loses the server for longer than the lease, the lease runs out and another
    process acquires the lock. That next holder gets a :class:`~safeshm.HolderDiedWarning`
    -- but unlike a ``SafeLock``'s, **the previous holder may still be running**: all
    Redis knows is that its lease expired without a release. The holder that lost its
    lease is told, as soon as it can be:

    * :attr:`lost` turns true, and :meth:`check` raises :class:`~safeshm.LeaseLostError`,
      once the lease may have ended (a renewal found the key gone or another token in it,
      or none succeeded for a whole lease) -- call it between steps of long work;
    * :meth:`release` (and so the end of a ``with`` block) raises
      :class:`~safeshm.LeaseLostError` when the server shows that the lease ran out first.

    **Fencing tokens.** Every acquire increments a counter on the server, and
    :attr:`fencing_token` is the holder's value: strictly larger for every later holder.
    Checking whether you still hold the lock and then writing is always a race (a pause
    can fall between the two); the fix is for the *resource* to check: send the token
    with every write done under the lock, and have the resource refuse a token smaller
    than the largest it has seen. A paused holder that wakes up after its lease then
    cannot overwrite its successor's work::

        with lock:
            db.execute("UPDATE jobs SET owner = %s, fence = %s WHERE id = %s AND fence < %s",
                       (me, lock.fencing_token, job, lock.fencing_token))

    The counter lives on the server: it survives restarts as far as the server's data
    does (``appendonly yes``, ``appendfsync always``), and :meth:`unlink` resets it.

    **Waiting** costs nothing while the lock is held: a waiter subscribes to the lock's
    channel, and ``release()`` publishes on it, so the lock is handed over within a few
    round trips (no 100 ms polling, as redis-py's ``Lock`` does), and a waiter also
    wakes when the holder's lease would run out.

    **Network failures** are typed, never redis-py's: a server that cannot be reached is
    :class:`~safeshm.BackendUnavailableError` (nothing was applied). An acquire whose
    connection drops after the request was sent is asked again with the same token (the
    script is idempotent per token), so the caller learns whether it holds the lock;
    only when that fails too is it :class:`~safeshm.OutcomeUnknownError`, and then the
    lock is held by no one who knows it until its lease runs out. A release that does
    not reach the server raises, and is retried in the background until it succeeds or
    the lease would have ended anyway.

    Limits: one Redis server (or one Cluster shard): a failover to a replica that missed
    the last write can hand the lock to two holders (no Redlock, on purpose: see Martin
    Kleppmann's analysis; use the fencing token). Timeouts bound the waiting, but one
    command to an unresponsive server may take redis-py's socket timeout (10 s).

    Example:
        >>> lock = RedisLock.open("redis://localhost:6379/0#jobs")  # doctest: +SKIP
        >>> with lock:  # doctest: +SKIP
        ...     token = lock.fencing_token  # send it with the writes you make
    """

    _kind_tag: ClassVar[str] = "lock"
    #: What this backend promises: any machine that reaches the server; a dead holder is
    #: detected when its lease runs out (it may still be running); an acquire can end in
    #: ``OutcomeUnknownError``; the lock's keys survive a server crash only with
    #: ``appendfsync always`` (see the class docs).
    guarantees: ClassVar[Guarantees] = Guarantees(
        backend="redis",
        scope="network",
        holder_death="lease",
        outcome_unknown=True,
        survives="server-memory",
    )

    def __init__(self, url: str, lease: float = 30.0, renew: bool = True) -> None:
        """Use :meth:`open`. (``RedisStructure`` reopens a pickled handle with this.)"""
        self._lease = _check_lease(lease)
        if not isinstance(renew, bool):
            raise TypeError(f"renew must be True or False, not {type(renew).__name__}")
        self._renew = renew
        self._lease_ms = max(1, round(self._lease * 1000))
        # Not RedisStructure.__init__: its kind claim would run before the check that the
        # lock's keys hold no foreign data, and a failed open must change nothing.
        conn = self._conn = Connection(type(self).__name__, url)
        self._what = f"RedisLock {conn.name!r}"
        self._lease_key = conn.key("lease")
        self._state_key = conn.key("state")
        self._fence_key = conn.key("fence")
        self._channel = conn.key("released")
        self._channel_b = self._channel.encode()
        try:
            keys = [conn.kind_key, self._lease_key, self._state_key, self._fence_key]
            found = conn.call(lambda c: conn.script(_CHECK_TYPES)(keys=keys), idempotent=True)
            if found != b"ok":
                text = found.decode() if isinstance(found, bytes) else str(found)
                raise IncompatibleKeyError(f"cannot open {conn.what}: {text}")
            conn.claim_kind(self._kind_tag)
        except BaseException:
            conn.close()
            raise
        self._st = self._new_state()

    @classmethod
    def open(cls, url: str, *, lease: float = 30.0, renew: bool = True) -> Self:
        """Open the lock named by ``url`` (``redis://HOST:PORT/DB#NAME``).

        Nothing is created until the first acquire: many processes may open one name at
        once. ``lease`` and ``renew`` are this handle's: handles with other leases can
        share the lock.

        Args:
            url: the server and the lock's name (the fragment).
            lease: how long a hold lasts without a renewal, in seconds. It bounds how long
                others wait after a holder died, and how long a holder may be paused or
                cut off before it loses the lock.
            renew: renew the lease in a background thread every ``lease / 3`` while held;
                with ``False``, call :meth:`extend` before the lease runs out.

        Raises:
            ValueError: not a Redis URL, no ``#NAME``, or a lease out of range.
            TypeError: ``lease`` is not a number, or ``renew`` not a bool.
            IncompatibleKeyError: the name holds another kind of structure, or keys of the
                lock hold data of another type. Nothing was changed.
            BackendUnavailableError: the server cannot be reached.
        """
        return cls(url, lease, renew)

    def _reopen_args(self) -> tuple[Any, ...]:
        return (self.url, self._lease, self._renew)

    @property
    def lease(self) -> float:
        """This handle's lease, in seconds."""
        return self._lease

    @property
    def renew(self) -> bool:
        """Whether this handle renews its holds' leases in the background."""
        return self._renew

    # -- state -----------------------------------------------------------------------------
    @staticmethod
    def _new_state() -> _State:
        return _State(
            pid=os.getpid(),
            cond=threading.Condition(threading.Lock()),
            holds={},
            jobs=set(),
            local=threading.local(),
            pubsubs=[],
        )

    def _state(self) -> _State:
        st = self._st
        if st.pid != os.getpid():  # a forked child: nothing of the parent's is ours
            st = self._st = self._new_state()
        return st

    def _my_hold(self) -> _Hold:
        hold = self._state().holds.get(threading.current_thread())
        if hold is None:
            raise LockNotHeldError(f"{self._what} is not held by this thread")
        return hold

    # -- acquire ----------------------------------------------------------------------------
    def acquire(self, blocking: bool = True, timeout: float | None = -1) -> bool:
        """Acquire the lock, like :meth:`threading.Lock.acquire`.

        ``acquire()`` waits as long as it takes; ``acquire(timeout=2.0)`` waits at most 2
        seconds; ``acquire(False)`` (or :meth:`acquire_nowait`) tries once. ``timeout=-1``
        and ``timeout=None`` both mean "forever". A waiter is woken by the release (a
        publish) or when the holder's lease would run out.

        Returns:
            ``True`` once acquired (:attr:`fencing_token` is then this hold's); ``False``
            if the timeout expired first (or, without ``blocking``, if it is held).

        Raises:
            LockReentryError: the calling thread already holds the lock (through this
                handle or another).
            ValueError: a timeout with ``blocking=False``, or a negative timeout other
                than ``-1``, or NaN.
            OverflowError: a timeout beyond ``threading.TIMEOUT_MAX``.
            TypeError: ``timeout`` is not a number.
            BackendUnavailableError: the server cannot be reached (not acquired).
            OutcomeUnknownError: the connection dropped after the request was sent and
                asking again failed: the lock may be held under this call's token, by no
                one who knows it, until its lease runs out.

        Warns:
            HolderDiedWarning: the previous holder's lease ran out without a release; the
                lock is now the caller's. The previous holder may still be running. (If
                warnings are turned into errors, the lock is released before the error
                propagates.)
        """
        if blocking:
            if timeout is None or timeout == -1:
                deadline = _NEVER
            else:
                deadline = time.monotonic() + check_lock_timeout(timeout)  # type: ignore[operator]
        elif timeout is None or timeout == -1:
            deadline = 0.0
        else:
            raise ValueError("can't specify a timeout for a non-blocking call")
        self._conn.check_open()
        st = self._state()
        me = threading.current_thread()
        if me in st.holds:
            raise self._reentry("")
        identity = _thread_identity()
        token = identity + secrets.token_hex(8)
        result, sent = self._attempt(token, deadline)
        if result[0] == 1:
            return self._won(st, me, token, result, sent)
        self._check_not_mine(result[1], identity)
        if deadline <= time.monotonic():  # acquire(False), or timeout=0
            return False
        return self._wait(st, me, token, identity=identity, deadline=deadline)

    def acquire_nowait(self) -> bool:
        """Try once: ``acquire(blocking=False)``. ``True`` if acquired."""
        return self.acquire(False)

    def _reentry(self, how: str) -> LockReentryError:
        return LockReentryError(
            f"{self._what} is already held by this thread{how}; it is not reentrant, so "
            "acquiring it again would wait forever"
        )

    def _check_not_mine(self, holder: bytes, identity: str) -> None:
        token = holder.decode(errors="replace")
        if token.startswith(identity) and token in _held_tokens:
            raise self._reentry(" (through another handle)")

    def _attempt(self, token: str, deadline: float) -> tuple[list[Any], float]:
        """One run of the acquire script: (its result, when it was first sent)."""
        conn = self._conn
        script = conn.script(_ACQUIRE)
        keys = [self._lease_key, self._state_key, self._fence_key]
        args = [token, self._lease_ms]

        def run(c: Any) -> list[Any]:
            return script(keys=keys, args=args, client=c)  # type: ignore[no-any-return]

        loading = None if deadline == _NEVER else deadline
        sent = time.monotonic()
        try:
            return conn.call(run, idempotent=False, deadline=loading), sent
        except OutcomeUnknownError as exc:
            # The script is idempotent per token: sent again, it acquires if the first
            # never ran, or reports what the first did. Either way the caller knows.
            try:
                return conn.call(run, idempotent=True, deadline=loading), sent
            except (BackendUnavailableError, OutcomeUnknownError) as again:
                raise OutcomeUnknownError(
                    f"acquiring {self._what}: the connection dropped after the request "
                    f"was sent, and asking again failed ({again}). The lock may be held "
                    f"under this call's token, by no one who knows it, until its lease "
                    f"runs out (within {self._lease:g} s); the next holder is then warned"
                ) from exc

    def _won(
        self, st: _State, me: threading.Thread, token: str, result: list[Any], sent: float
    ) -> bool:
        lease = self._lease
        hold = _Hold(token, int(result[1]), me, lease, sent + lease, sent + lease / 3)
        with st.cond:
            st.holds[me] = hold
            _held_tokens.add(token)
            if self._renew:
                self._add_job(st, hold)
        previous = result[2].decode(errors="replace")
        if previous != "-":
            try:
                warnings.warn(
                    HolderDiedWarning(
                        f"{self._what}: the previous holder's lease ran out without a "
                        f"release (holder: {_who(previous)}); the lock is now held by this "
                        "thread. The previous holder may still be running -- paused, slow "
                        "or cut off from Redis -- and acting as if it held the lock: "
                        "whatever it was changing may be incomplete, and a resource that "
                        "must not see its late writes should check the fencing token "
                        f"(this hold's is {hold.fence})"
                    ),
                    stacklevel=_user_stacklevel(),
                )
            except BaseException:
                with contextlib.suppress(SafeShmError):
                    self.release()
                raise
        return True

    def _wait(
        self,
        st: _State,
        me: threading.Thread,
        token: str,
        *,
        identity: str,
        deadline: float,
    ) -> bool:
        """Subscribe, try again, and sleep until a release or the lease's end; repeat."""
        ps = self._subscriber(st)
        ok = False
        try:
            # The loops in a method of their own: see _releasing.
            won = self._wait_subscribed(ps, token, identity=identity, deadline=deadline)
            ok = True
            return False if won is None else self._won(st, me, token, *won)
        finally:
            self._unsubscribe(ps, clean=ok)

    def _wait_subscribed(
        self, ps: Any, token: str, *, identity: str, deadline: float
    ) -> tuple[list[Any], float] | None:
        """The winning attempt's reply and when it was sent; ``None``: the deadline passed."""
        drops = 0
        while True:
            if not self._subscribe(ps, deadline):
                return None
            while True:
                result, sent = self._attempt(token, deadline)
                if result[0] == 1:
                    return result, sent
                self._check_not_mine(result[1], identity)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                pttl = int(result[2])
                # +2 ms: the key is surely gone when we look again. A lease key without
                # an expiry (PTTL -1: someone PERSISTed it) is looked at every second.
                wait = min(remaining, 1.0 if pttl < 0 else pttl / 1000 + 0.002)
                if not self._listen(ps, wait):
                    break  # the subscriber's connection dropped: subscribe again
                drops = 0
            drops += 1
            if drops >= _MAX_DROPS:
                raise BackendUnavailableError(
                    f"waiting for {self._what}: the subscriber connection dropped "
                    f"{drops} times in a row"
                )

    # -- pub/sub ----------------------------------------------------------------------------
    def _subscriber(self, st: _State) -> Any:
        """The calling thread's subscriber (one connection, kept between waits)."""
        ps = getattr(st.local, "pubsub", None)
        if ps is None:
            ps = self._conn.call(lambda c: c.pubsub(), idempotent=True)
            st.local.pubsub = ps
            with st.cond:
                st.pubsubs.append(ps)
        return ps

    def _subscribe(self, ps: Any, deadline: float) -> bool:
        """Subscribe to the channel and wait for the server's confirmation (only after
        it can an attempt rely on hearing the next release). ``False``: the deadline
        passed first."""
        channel, channel_b = self._channel, self._channel_b

        def run(c: Any) -> bool:
            try:
                ps.subscribe(channel)
                give_up = time.monotonic() + _CONFIRM_WAIT
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        ps.reset()  # the confirmation is still to come: start clean
                        return False
                    if now >= give_up:
                        ps.reset()
                        raise BackendUnavailableError(
                            f"{self._conn.what}: no reply to SUBSCRIBE within {_CONFIRM_WAIT:g} s"
                        )
                    msg = ps.get_message(timeout=min(deadline, give_up) - now)
                    # Before it: a previous wait's unsubscribe reply, or releases heard
                    # before that unsubscribe took effect. Neither matters now.
                    if msg and msg["type"] == "subscribe" and msg["channel"] == channel_b:
                        return True
            except SafeShmError:
                raise
            except rex.RedisError:
                ps.reset()
                raise
            except _CUT_SHORT as exc:
                self._cut_short(ps, exc)
                raise  # unreachable: _cut_short raises

        return self._conn.call(run, idempotent=True)

    def _listen(self, ps: Any, wait: float) -> bool:
        """Sleep until a message arrives or ``wait`` seconds pass. ``False``: the
        connection dropped (the subscription with it), or the handle was closed (the
        next subscribe says so)."""
        try:
            ps.get_message(timeout=wait)
        except rex.RedisError:
            ps.reset()
            return False
        except _CUT_SHORT as exc:
            if not self._conn.closed:
                self._cut_short(ps, exc)
            return False
        return True

    def _cut_short(self, ps: Any, exc: Exception) -> None:
        """A subscriber's socket was closed under it (``close()`` in another thread):
        redis-py then fails with builtin errors. Raise the typed error."""
        with contextlib.suppress(rex.RedisError, *_CUT_SHORT):
            ps.reset()
        self._conn.check_open()  # ClosedHandleError
        raise BackendUnavailableError(
            f"{self._conn.what}: the subscriber connection failed: {exc!r}"
        ) from exc

    @staticmethod
    def _unsubscribe(ps: Any, *, clean: bool) -> None:
        """Stop listening: UNSUBSCRIBE (its reply is skipped by the next wait), or, after
        an exception that may have cut a reply short, drop the connection."""
        if not clean:
            with contextlib.suppress(rex.RedisError):
                ps.reset()
            return
        if ps.connection is None or not ps.channels:
            return
        try:
            ps.unsubscribe()
        except rex.RedisError:
            with contextlib.suppress(rex.RedisError):
                ps.reset()

    # -- renewal ----------------------------------------------------------------------------
    def _add_job(self, st: _State, hold: _Hold) -> None:
        """Give ``hold`` to the renewal thread (``st.cond`` held)."""
        st.jobs.add(hold)
        if st.worker is None:
            st.worker = threading.Thread(
                target=_work,
                args=(st, self._conn, self._lease_key, self._state_key, self._channel),
                name=f"safeshm-renew-{self._conn.name}",
                daemon=True,
            )
            st.worker.start()
        elif hold.due < st.wake_at:
            # Only when it sleeps past the new due time: an acquire in a hot loop must
            # not wake it (a thread switch inside the caller's critical section).
            st.cond.notify()

    def extend(self, lease: float | None = None) -> None:
        """Renew this thread's lease now, for ``lease`` seconds (default: the handle's),
        counted from now. Needed only with ``renew=False``; with ``renew=True`` a given
        ``lease`` also becomes the renewal thread's from now on.

        Raises:
            LockNotHeldError: the calling thread does not hold the lock.
            LeaseLostError: the lease had already run out (the key is gone or another
                holder's): nothing was extended.
            BackendUnavailableError: the server cannot be reached (retry; :attr:`lost`
                says whether it is too late).
        """
        seconds = self._lease if lease is None else _check_lease(lease)
        hold = self._my_hold()
        self._raise_if_lost(hold)
        conn = self._conn
        script = conn.script(_EXTEND)
        keys, args = [self._lease_key], [hold.token, max(1, round(seconds * 1000))]
        sent = time.monotonic()
        done = conn.call(lambda c: script(keys=keys, args=args, client=c), idempotent=True)
        st = self._state()
        with st.cond:
            if done == 1:
                hold.lease = seconds
                hold.expires = max(hold.expires, sent + seconds)
                hold.due = sent + seconds / 3
                if hold in st.jobs and hold.due < st.wake_at:
                    st.cond.notify()
                return
            hold.lost = "an extend() found the lease already gone or another holder's"
            st.jobs.discard(hold)
        self._raise_if_lost(hold)

    # -- release ----------------------------------------------------------------------------
    def release(self) -> None:
        """Release the lock: compare-and-delete, so it never releases another holder's.

        Raises:
            LockNotHeldError: the calling thread does not hold it.
            LeaseLostError: the lease had run out before this release: another process
                may have held the lock since (the message says whether one did), and
                what this thread did since the lease ended was not protected. The lock
                is no longer this thread's either way.
            BackendUnavailableError, OutcomeUnknownError: the release did not reach the
                server, or its reply was lost. The lock is no longer this thread's; the
                release is retried in the background until it succeeds or the lease
                runs out.
        """
        st = self._state()
        me = threading.current_thread()
        with st.cond:
            hold = st.holds.pop(me, None)
            if hold is None:
                raise LockNotHeldError(f"{self._what} is not held by this thread")
            st.jobs.discard(hold)
            _held_tokens.discard(hold.token)
        if self._conn.closed:
            # close() in another thread released it already (see close()).
            raise LeaseLostError(f"{self._what}: {hold.lost or 'the handle was closed'}")
        outcome = self._send_release(st, hold)
        if outcome == 1:
            return
        if outcome == 2:
            raise LeaseLostError(
                f"{self._what}: the lease ran out before release() (after {hold.lease:g} s "
                "without a renewal); nobody acquired the lock meanwhile, so fencing token "
                f"{hold.fence} is still the latest, and the lock is now free"
            )
        raise LeaseLostError(
            f"{self._what}: the lease ran out before release() and another holder "
            "acquired the lock since (or it was unlinked); what this thread did after "
            f"the lease ended was not protected (its fencing token was {hold.fence}). "
            "This release changed nothing"
        )

    def _send_release(self, st: _State, hold: _Hold) -> int:
        conn = self._conn
        script = conn.script(_RELEASE)
        keys, args = [self._lease_key, self._state_key], [hold.token, self._channel]

        def run(c: Any) -> int:
            return int(script(keys=keys, args=args, client=c))

        later = (
            f"the lock stays held until the release, retried in the background, gets "
            f"through, or its lease runs out (within {hold.lease:g} s)"
        )
        try:
            # Not idempotent=True: a retry after a dropped reply must be told apart from a
            # release that reached nobody (the script's state makes a second send safe).
            return conn.call(run, idempotent=False)
        except BackendUnavailableError as exc:
            self._release_later(st, hold)
            raise type(exc)(f"releasing {self._what}: {exc}; {later}") from exc
        except OutcomeUnknownError as exc:
            try:
                return conn.call(run, idempotent=True)
            except (BackendUnavailableError, OutcomeUnknownError):
                self._release_later(st, hold)
                raise OutcomeUnknownError(
                    f"releasing {self._what}: the connection dropped after the release "
                    f"was sent and asking again failed; {later}"
                ) from exc

    def _release_later(self, st: _State, hold: _Hold) -> None:
        with st.cond:
            if st.stopped:
                return
            hold.releasing = True
            hold.due = time.monotonic() + _retry_after(hold.lease)
            self._add_job(st, hold)

    def __enter__(self) -> Self:
        """``with lock:`` acquires (waiting as long as it takes) and releases."""
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquired(self, timeout: float | None = None) -> GeneratorHold[Self]:
        """``with lock.acquired(timeout=2.0):`` -- hold the lock for a block, or raise.

        Raises:
            LockTimeoutError: not acquired within ``timeout`` seconds (also a
                ``TimeoutError``).
        """
        return GeneratorHold(functools.partial(self._acquired, timeout))

    def _acquired(self, timeout: float | None) -> Generator[Self | bool, object, None]:
        if not self.acquire(timeout=timeout):
            raise LockTimeoutError(f"{self._what} not acquired within {timeout} s")
        try:
            yield self
        finally:
            self.release()
        yield False  # __exit__'s result: an exception from the block propagates

    # -- the holder's view ------------------------------------------------------------------
    @property
    def fencing_token(self) -> int:
        """The calling thread's hold's fencing token: larger than every earlier holder's.
        Send it with the writes made under the lock (see the class docs).

        Raises:
            LockNotHeldError: the calling thread does not hold the lock.
        """
        return self._my_hold().fence

    @property
    def lost(self) -> bool:
        """Whether the calling thread's lease may have ended: a renewal found it gone or
        another holder's, or no renewal succeeded within a lease. Conservative: it turns
        true no later than the server lets the lease go (the clocks run at one rate).

        Raises:
            LockNotHeldError: the calling thread does not hold the lock.
        """
        hold = self._my_hold()
        return hold.lost is not None or time.monotonic() >= hold.expires

    def check(self) -> float:
        """Raise if the calling thread's lease may have ended; otherwise return how many
        seconds of it surely remain. Call it between the steps of long work under the
        lock (it sends nothing).

        Raises:
            LeaseLostError: see :attr:`lost`. (Still call :meth:`release`.)
            LockNotHeldError: the calling thread does not hold the lock.
        """
        hold = self._my_hold()
        self._raise_if_lost(hold)
        return hold.expires - time.monotonic()

    def _raise_if_lost(self, hold: _Hold) -> None:
        if hold.lost is not None:
            raise LeaseLostError(f"{self._what}: {hold.lost} (fencing token {hold.fence})")
        late = time.monotonic() - hold.expires
        if late >= 0:
            raise LeaseLostError(
                f"{self._what}: no renewal of the lease succeeded for {hold.lease:g} s "
                f"(it may have ended {late:.3g} s ago; fencing token {hold.fence})"
            )

    def locked(self) -> bool:
        """Whether anyone holds the lock right now (its lease key exists). A snapshot."""
        key = self._lease_key
        return bool(self._conn.call(lambda c: c.exists(key), idempotent=True))

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close this handle; idempotent. A lock this handle holds is released (for every
        thread: a thread of this handle that still held it gets
        :class:`~safeshm.LeaseLostError` from its ``release()``), its renewal stops and
        its connections close. The lock's keys stay."""
        if self.closed:
            return
        st = self._state()
        me = threading.current_thread()
        with st.cond:
            st.stopped = True
            holds = list(st.holds.items())
            pending = _releasing(st.jobs)  # no loop inside the with: see _releasing
            st.jobs.clear()
            st.cond.notify_all()
        for thread, hold in holds:
            _held_tokens.discard(hold.token)
            with contextlib.suppress(SafeShmError):
                self._release_once(hold)
            if thread is me:
                st.holds.pop(me, None)
            else:
                hold.lost = "another thread closed the handle while this thread held the lock"
        for hold in pending:
            with contextlib.suppress(SafeShmError):
                self._release_once(hold)
        for ps in st.pubsubs:
            with contextlib.suppress(rex.RedisError):
                ps.reset()
        self._conn.close()

    def _release_once(self, hold: _Hold) -> None:
        script = self._conn.script(_RELEASE)
        keys, args = [self._lease_key, self._state_key], [hold.token, self._channel]
        self._conn.call(lambda c: script(keys=keys, args=args, client=c), idempotent=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        renew = "" if self._renew else ", renew=False"
        return (
            f"<{type(self).__name__} {self.name!r} at {_redact(self.url)} "
            f"({state}, lease={self._lease:g}{renew})>"
        )


def _work(st: _State, conn: Connection, lease_key: str, state_key: str, channel: str) -> None:
    """A handle's renewal thread: extends the leases of its holds every ``lease / 3``, and
    retries releases that did not get through. It holds no reference to the handle (a
    dropped handle's thread ends on its own: its holds' threads end or release).
    """
    extend = conn.script(_EXTEND)
    release = conn.script(_RELEASE)
    idle_since = time.monotonic()
    while True:
        with st.cond:
            job, idle_since = _next_job(st, idle_since)
        if job is None:
            return
        if job.releasing:
            _retry_release(st, conn, release, job, keys=[lease_key, state_key], channel=channel)
        elif not job.thread.is_alive():
            # The holding thread ended without releasing: as with a SafeLock, the lock is
            # left to be recovered (here: when the lease runs out), and the next holder is
            # told, rather than released as if its work were done.
            with st.cond:
                st.jobs.discard(job)
        else:
            _renew(st, conn, extend, job, lease_key)


def _next_job(st: _State, idle_since: float) -> tuple[_Hold | None, float]:
    """Holding ``st.cond``: wait for the next hold that is due, and return it with the new
    idle time; ``None`` when the thread is to end (stopped, forked, or idle too long).
    The loop is a function of its own, called inside ``with st.cond`` (see _releasing)."""
    while True:
        now = time.monotonic()
        if st.stopped or st.pid != os.getpid():
            st.worker = None
            return None, idle_since
        job = min(st.jobs, key=_due, default=None)
        if job is not None:
            idle_since = now
            if job.due <= now:
                return job, idle_since
            wait = job.due - now
        else:
            if now - idle_since >= _IDLE_EXIT:
                st.worker = None
                return None, idle_since
            wait = _IDLE_EXIT
        st.wake_at = now + wait
        st.cond.wait(wait)
        st.wake_at = -_NEVER


def _releasing(jobs: set[_Hold]) -> list[_Hold]:
    """The holds being released in the background. A function of its own, called inside
    ``with st.cond``: on 3.13 a signal handler's exception at a loop's back edge -- an
    inlined comprehension's too -- can skip the enclosing with's exit, leaving the condition
    held (tests/test_async_bytecode.py)."""
    return [h for h in jobs if h.releasing]


def _due(hold: _Hold) -> float:
    return hold.due


def _renew(
    st: _State, conn: Connection, extend: Callable[..., Any], job: _Hold, lease_key: str
) -> None:
    lease = job.lease
    args = [job.token, max(1, round(lease * 1000))]
    sent = time.monotonic()
    try:
        done: int | None = int(
            conn.call(lambda c: extend(keys=[lease_key], args=args, client=c), idempotent=True)
        )
    except SafeShmError:
        done = None  # unreachable (or closed meanwhile): try again soon
    with st.cond:
        if job not in st.jobs:  # released meanwhile
            return
        now = time.monotonic()
        if done == 1:
            job.expires = max(job.expires, sent + lease)
            job.due = sent + lease / 3
        elif done == 0:
            job.lost = "a renewal found the lease gone or another holder's: it had run out"
            st.jobs.discard(job)
        elif now >= job.expires:
            job.lost = f"no renewal reached the server for {lease:g} s: the lease may have ended"
            st.jobs.discard(job)
        else:
            job.due = now + _retry_after(lease)


def _retry_release(
    st: _State,
    conn: Connection,
    release: Callable[..., Any],
    job: _Hold,
    *,
    keys: list[str],
    channel: str,
) -> None:
    args = [job.token, channel]
    try:
        conn.call(lambda c: release(keys=keys, args=args, client=c), idempotent=True)
        done = True
    except SafeShmError:
        done = False
    with st.cond:
        now = time.monotonic()
        if done or now >= job.expires:
            st.jobs.discard(job)
        else:
            job.due = now + _retry_after(job.lease)
