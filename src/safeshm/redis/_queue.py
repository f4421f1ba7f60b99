"""RedisQueue[T]: ``SafeQueue``'s bounded FIFO on a Redis server, for processes on many hosts.

Keys of the queue ``NAME`` (one hash tag, so one Cluster slot; every script is passed all
of them in ``KEYS``):

* ``safeshm:{NAME}`` -- the kind (``queue``) and the parameters: ``capacity``, ``raw``,
  ``maxsize``, ``delivery``, checked by every ``open()``;
* ``safeshm:{NAME}:items`` -- a list, the queued items (pickled, or raw bytes), front
  first;
* ``safeshm:{NAME}:state`` -- a hash: ``bytes`` (what the queue holds, see *Capacity*),
  ``lease`` (the last lease id handed out);
* ``safeshm:{NAME}:leases`` / ``:leased`` -- at-least-once mode: a sorted set of lease ids
  scored by their deadline (server time, ms) and a hash of lease id -> item;
* ``safeshm:{NAME}:getters`` / ``:wake-get`` and ``:putters`` / ``:wake-put`` -- the
  waiting rooms (see *Blocking*): a sorted set of the waiters registered in each direction
  (scored by when the registration lapses) and the list of wake-up tokens they ``BLPOP``.

**Capacity** is counted in bytes, as ``SafeQueue`` counts it: an item of ``n`` bytes
(pickled) takes ``n + 8`` rounded up to a multiple of 8, so the same items fit the same
``capacity`` on both backends, and an item that can never fit raises ``ValueError`` at
once. Every operation is one Lua script that changes the list and the ``bytes`` total
together, so the total is exact: no client failure between two commands can make it
drift (which is why a ``get`` is not a bare ``BLPOP`` of the items list: a consumer killed
between the ``BLPOP`` and the command lowering the total would leave the queue a little
fuller for ever). ``maxsize=`` optionally bounds the item count as well.

**Blocking** without polling, although a Lua script cannot block. A ``get`` that finds the
queue empty registers itself in the same script (``ZADD getters``), then blocks in the
server: one pipeline of ``BLPOP wake-get`` and the ``get`` script again. A ``put`` that
adds ``k`` items pushes ``min(k, waiters)`` tokens onto ``wake-get`` (the list keeps at
most one per waiter); Redis hands each token to the longest-blocked ``BLPOP`` within the
same event-loop turn, and the pipelined script runs right after it, before any reply is
sent: the woken consumer has its item about one round trip after the ``put``, as with a
bare ``BRPOP``. No wake-up is lost: registration and the emptiness check are one script,
and a token pushed before the ``BLPOP`` starts waits in the list for it. A blocked ``put``
on a full queue does the same in the other direction (``putters``/``wake-put``; ``get``,
``get_many`` and ``ack`` push "room" tokens). A ``BLPOP`` lasts at most one second; the
script after it renews the registration, which lapses after three seconds without renewal.
So a waiter that died is forgotten within seconds (a dead client's ``BLPOP`` takes no
token), and in the rare case where a consumer dies between its token and its script --
its connection cut just then -- the other waiters notice the item within a second. Why
not pub/sub, as ``RedisLock`` does: a publish wakes every waiter for every item (a herd on
a busy queue), while a token wakes one. On a Redis Cluster (where redis-py pipelines no
scripts) the wait and the script are two commands: one more round trip per wake-up.

**Delivery.** ``delivery="at-most-once"`` (the default): ``get`` removes the item in the
script that returns it, as ``SafeQueue.get`` does; a consumer that dies during or after
its ``get`` may lose the item. ``delivery="at-least-once"``: :meth:`RedisQueue.get_leased`
(the API of ``SafeQueue.get_leased``) moves the item, in the same script, into the lease
set with a deadline; :meth:`RedisLease.ack` drops it, :meth:`RedisLease.release` puts it back at the
front. A lease that ran out before its ack -- its consumer died, hung, or is still running
past it -- is put back at the front of the queue, once, by the next ``get`` of any kind,
``get_leased`` or :meth:`~RedisQueue.reclaim_leases` of any consumer (a blocked one wakes
up for it); that call warns :class:`~safeshm.HolderDiedWarning`, as the next acquirer of
an expired ``RedisLock`` is warned. Deadlines are the server's clock (``TIME`` in the
scripts), so clients' clocks do not matter.

Why lists and Lua rather than Streams with consumer groups and ``XAUTOCLAIM``: a stream
cannot enforce a byte capacity atomically with ``XADD`` (``MAXLEN`` trims old entries
instead of refusing new ones), cannot take a batch all-or-nothing against a limit,
cannot put an entry back at the *front* (``XAUTOCLAIM`` hands it to a consumer directly,
so a redelivered item jumps no queue but also waits for someone to claim it), and keeps
acknowledged entries until trimmed. With a list, capacity, all-or-nothing ``put_many``,
FIFO order and redelivery at the front are each a few lines of one script. One lease set
for the whole queue, rather than a processing list per consumer (the ``BLMOVE`` reliable
queue): a reclaim must find the items of consumers it does not know, and a script may only
touch keys it is given -- a per-consumer key would have to be discovered first, which
neither Cluster nor atomicity allows.

**Unknown outcomes.** ``put``, ``put_many``, ``get``, ``get_many``, ``get_leased``, ``ack``
and ``release`` are not idempotent, so a connection dropped after one was sent raises
:class:`~safeshm.OutcomeUnknownError` and is never retried: a put may have been queued
(once) or not; an at-most-once get may have taken an item that is now lost; a
``get_leased`` that may have taken one is recovered by its lease: the item comes back when
the lease runs out. Because a blocked call's wait is pipelined with its next try, a
connection that drops *while a call is blocked* (a server restart, a network cut) also
ends in ``OutcomeUnknownError``: the try may have run just before the drop (on a Cluster,
where the two are separate, a drop during the wait is ``BackendUnavailableError``).
``qsize``, ``empty``, ``full`` and ``statistics`` are reads (retried once on a fresh
connection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import queue
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar, cast, overload

import redis.exceptions as rex

from safeshm._errors import (
    BackendUnavailableError,
    HolderDiedWarning,
    IncompatibleKeyError,
    ItemDecodeError,
    LeaseExpiredError,
    OutcomeUnknownError,
    SafeShmError,
)
from safeshm._protocols import Guarantees
from safeshm._queue import MIN_CAPACITY, _check_count
from safeshm._sync import user_stacklevel
from safeshm._timeout import check_timeout

from ._core import Connection, RedisStructure, _redact

__all__ = ["RedisLease", "RedisQueue", "RedisQueueStatistics"]

T = TypeVar("T")

Delivery = Literal["at-most-once", "at-least-once"]
_DELIVERIES: Final = ("at-most-once", "at-least-once")

_SLICE: Final = 1.0
"""Longest single ``BLPOP`` of a waiter (seconds): then it tries again and renews its
registration. Also bounds how long an item can sit unnoticed after the rare lost token."""
_REGISTRATION_MS: Final = 3000
"""A waiter's registration lapses this long after it was last renewed (every slice)."""
_MAX_CAPACITY: Final = 1 << 53
"""The scripts count bytes in Lua numbers (doubles): exact up to 2**53."""
_MIN_WAIT: Final = 0.001
"""``BLPOP`` counts milliseconds and reads 0 as "forever": never ask for less."""
_CUT_SHORT: Final = (OSError, ValueError, RuntimeError, AttributeError)
"""What redis-py raises, besides its own errors, when ``close()`` in another thread
closes the socket under a blocked read (``ValueError: I/O operation on closed file``)."""
_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
_NEVER: Final = math.inf

# The keys every script is given, in this order.
_PARTS: Final = (
    "items",
    "state",
    "getters",
    "wake-get",
    "putters",
    "wake-put",
    "leases",
    "leased",
)
_TYPES: Final = ("list", "hash", "zset", "list", "zset", "list", "zset", "hash")

# -- scripts ---------------------------------------------------------------------------------
# KEYS (all scripts): 1 items, 2 state, 3 getters, 4 wake-get, 5 putters, 6 wake-put,
# 7 leases, 8 leased.
_LIB: Final = """
-- The server's clock in ms, read once per script and only when needed (TIME costs).
local now_cache
local function now()
    if not now_cache then
        local t = redis.call('TIME')
        now_cache = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    return now_cache
end
-- Integers as exact decimal strings (tostring would write 1e+15 for large ones).
local function int(x) return string.format('%.0f', x) end
-- What an item of #s bytes takes, as SafeQueue counts it: an 8-byte header, 8-aligned.
local function need(s) return math.floor((#s + 15) / 8) * 8 end
-- Wake up to k of the waiters registered in the sorted set zkey (member: waiter id,
-- score: when its registration lapses) with tokens on the list lkey that they BLPOP;
-- the list keeps at most one token per waiter. Nobody waiting: one EXISTS.
local function wake(zkey, lkey, k)
    if redis.call('EXISTS', zkey) == 0 then return end
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now())
    local w = redis.call('ZCARD', zkey)
    if k > w then k = w end
    if k < 1 then return end
    local tokens = {}
    for i = 1, k do tokens[i] = '1' end
    redis.call('RPUSH', lkey, unpack(tokens))
    redis.call('LTRIM', lkey, -w, -1)
end
-- Put the items of expired leases back at the front, oldest lease first; how many.
local function reclaim()
    local due = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now())
    local n = #due
    if n == 0 then return 0 end
    table.sort(due, function(a, b) return tonumber(a) > tonumber(b) end)
    for i = 1, n do
        local item = redis.call('HGET', KEYS[8], due[i])
        if item then redis.call('LPUSH', KEYS[1], item) end
        redis.call('HDEL', KEYS[8], due[i])
        redis.call('ZREM', KEYS[7], due[i])
    end
    return n
end
"""

# The put and get scripts start with the same two ARGV: 1 the caller's waiter id ('': it
# does not wait), 2 its step: 'first' (register in the waiting room if the script finds no
# room or no item), 'again' (renew the registration; leave the room on success) or 'last'
# (leave the room either way). A waiter alone in the room clears the token list: tokens
# there were pushed for waiters that have gone.
_REGISTER: Final = f"""
local function register(zkey, lkey, ok)
    local waiter, step = ARGV[1], ARGV[2]
    if waiter == '' then return end
    if ok or step == 'last' then
        if step ~= 'first' then redis.call('ZREM', zkey, waiter) end
        return
    end
    local new = redis.call('ZADD', zkey, int(now() + {_REGISTRATION_MS}), waiter)
    if new == 1 and redis.call('ZCARD', zkey) == 1 then redis.call('DEL', lkey) end
end
"""

# ARGV: 1-2 (above), 3 capacity, 4 maxsize (0: none), 5... the items. 1: all put; 0: not
# enough room, nothing put.
_PUT: Final = (
    _LIB
    + _REGISTER
    + """
local k = #ARGV - 4
local total = 0
for i = 5, #ARGV do total = total + need(ARGV[i]) end
local used = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0')
local fits = used + total <= tonumber(ARGV[3])
local maxsize = tonumber(ARGV[4])
if fits and maxsize > 0 then
    fits = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[7]) + k <= maxsize
end
register(KEYS[5], KEYS[6], fits)
if not fits then return 0 end
for i = 5, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HINCRBY', KEYS[2], 'bytes', int(total))
wake(KEYS[3], KEYS[4], k)
return 1
"""
)

# ARGV: 1-2 (above), 3 max items, 4 lease ms ('': a plain get; 'inf': a lease that never
# runs out), 5 '1': reclaim expired leases first. Returns {redelivered, lease id or 0, ms
# until the next lease runs out or -1, items...}; no items: nothing taken.
_GET: Final = (
    _LIB
    + _REGISTER
    + """
local back = 0
if ARGV[5] == '1' then back = reclaim() end
local n = tonumber(ARGV[3])
local got
if n == 1 then
    local x = redis.call('LPOP', KEYS[1])
    if x then got = {x} else got = {} end
else
    got = redis.call('LPOP', KEYS[1], n) or {}
end
register(KEYS[3], KEYS[4], #got > 0)
if #got == 0 then
    local due = -1
    if ARGV[5] == '1' then
        local first = redis.call('ZRANGE', KEYS[7], 0, 0, 'WITHSCORES')
        if #first > 0 and first[2] ~= 'inf' then due = math.max(0, tonumber(first[2]) - now()) end
    end
    return {back, 0, int(due)}
end
if back > #got then wake(KEYS[3], KEYS[4], back - #got) end
if ARGV[4] ~= '' then
    local id = redis.call('HINCRBY', KEYS[2], 'lease', 1)
    local deadline = '+inf'
    if ARGV[4] ~= 'inf' then deadline = int(now() + tonumber(ARGV[4])) end
    redis.call('ZADD', KEYS[7], deadline, id)
    redis.call('HSET', KEYS[8], id, got[1])
    return {back, id, -1, got[1]}
end
local freed = 0
for i = 1, #got do freed = freed + need(got[i]) end
redis.call('HINCRBY', KEYS[2], 'bytes', int(-freed))
wake(KEYS[5], KEYS[6], #got)
local out = {back, 0, -1}
for i = 1, #got do out[i + 3] = got[i] end
return out
"""
)

# ARGV: 1 lease id, 2 'ack' or 'release'. 1: done; 0: the lease had ended (nothing changed).
_END_LEASE: Final = (
    _LIB
    + """
if redis.call('ZREM', KEYS[7], ARGV[1]) == 0 then return 0 end
local item = redis.call('HGET', KEYS[8], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1])
if not item then return 1 end
if ARGV[2] == 'release' then
    redis.call('LPUSH', KEYS[1], item)
    wake(KEYS[3], KEYS[4], 1)
else
    redis.call('HINCRBY', KEYS[2], 'bytes', int(-need(item)))
    wake(KEYS[5], KEYS[6], 1)
end
return 1
"""
)

# No ARGV. The number of items put back.
_RECLAIM: Final = (
    _LIB
    + """
local back = reclaim()
if back > 0 then wake(KEYS[3], KEYS[4], back) end
return back
"""
)

# ARGV: 1 waiter id, 2 '3' (getters) or '5' (putters). Drops a registration (a waiter that
# gives up).
_UNREGISTER: Final = """
redis.call('ZREM', KEYS[tonumber(ARGV[2])], ARGV[1])
return 1
"""

# Read-only. {items, bytes, leased, live getters, live putters}.
_STATS: Final = (
    _LIB
    + """
return {
    redis.call('LLEN', KEYS[1]),
    tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0'),
    redis.call('ZCARD', KEYS[7]),
    redis.call('ZCOUNT', KEYS[3], '(' .. int(now()), '+inf'),
    redis.call('ZCOUNT', KEYS[5], '(' .. int(now()), '+inf'),
}
"""
)

# Read-only; run before the kind is claimed, so foreign data under the name changes
# nothing. ARGV: the expected type of each key (absent is fine).
_CHECK_TYPES: Final = """
for i = 1, #KEYS do
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= 'none' and t ~= ARGV[i] then
        return 'the key ' .. KEYS[i] .. ' holds a Redis ' .. t .. ', expected a ' .. ARGV[i]
    end
end
return 'ok'
"""

# KEYS[1] the kind key. ARGV: (field, wanted value or '' for "any", default) triples: a
# wanted value must be what is stored (it is stored if nothing is); "any" stores the
# default if nothing is. Returns the stored values, or {'!', message}.
_OPTIONS: Final = """
local out = {}
for i = 1, #ARGV, 3 do
    local field, want, default = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if want == '' then want = nil end
    redis.call('HSETNX', KEYS[1], field, want or default)
    local have = redis.call('HGET', KEYS[1], field)
    if want and have ~= want then
        return {'!', 'it was created with ' .. field .. '=' .. have .. ', not ' .. want}
    end
    out[#out + 1] = have
end
return out
"""


def _need(n: int) -> int:
    """Queue bytes an ``n``-byte item takes (as ``SafeQueue`` counts its ring)."""
    return (n + 15) & ~7


@dataclasses.dataclass(frozen=True, slots=True)
class RedisQueueStatistics:
    """A snapshot of a :class:`RedisQueue` (see :meth:`RedisQueue.statistics`)."""

    name: str
    items: int
    """Items queued (not counting leased ones)."""
    bytes_used: int
    """What the queue holds, queued and leased items, as counted against the capacity."""
    capacity: int
    maxsize: int
    raw: bool
    delivery: Delivery
    leased: int
    """Items out on a lease (taken with ``get_leased``, not acknowledged yet)."""
    waiting_getters: int
    """Consumers registered as blocked in a get (registrations lapse within seconds)."""
    waiting_putters: int
    """Producers registered as blocked in a put."""


class RedisQueue(RedisStructure, Generic[T]):
    """A bounded multi-producer, multi-consumer FIFO queue on a Redis server.

    The interface and errors of :class:`safeshm.SafeQueue` (``put``/``get`` with ``block``
    and ``timeout``, ``put_nowait``/``get_nowait``, all-or-nothing ``put_many``,
    ``get_many``, ``qsize``/``empty``/``full``, :class:`queue.Full` and
    :class:`queue.Empty`), for processes on any machine that reaches the server. Items are
    pickled, or with ``raw=True`` passed as ``bytes``; ``capacity`` counts bytes as
    ``SafeQueue`` does, so an item that can never fit raises ``ValueError`` at once. Each
    operation is one Lua script, atomic at the server. Blocked calls wait inside the
    server (``BLPOP`` of a wake-up token), woken about one round trip after the change
    they wait for, never by polling.

    ``delivery="at-least-once"`` adds leases with ``SafeQueue``'s API:
    :meth:`get_leased`, ``with q.leased() as item:``, :meth:`reclaim_leases`. An item
    whose lease runs out before its ack is delivered again, at the front.

    **Pickle and trust**: unpickling runs code, so whoever can write to the server (or
    the network path to it, without TLS) can run code in every consumer of a pickling
    queue. Use ``raw=True`` with a format of your own wherever the server is shared with
    less trusted clients; protect the server with a password or ACL (and ``rediss://``).

    Differences from ``SafeQueue``, by design:

    * a dead consumer is known only by its lease running out (``guarantees.holder_death
      == "lease"``), never at once, and the consumer may still be running;
    * leased items count against ``capacity`` and ``maxsize`` until acknowledged (so a
      redelivery always has room), where ``SafeQueue`` keeps them in separate slots;
    * there is no ``shutdown()``, ``task_done()``/``join()`` or lease table size;
    * a write whose connection drops ends in :class:`~safeshm.OutcomeUnknownError` (see
      the module docs), and durability is the server's (``appendfsync always`` keeps
      every acknowledged put across a crash).

    Example:
        >>> jobs = RedisQueue.open("redis://localhost:6379/0#jobs", 1 << 20)  # doctest: +SKIP
        >>> jobs.put({"id": 1})  # doctest: +SKIP
        >>> jobs.get(timeout=1)  # doctest: +SKIP
        {'id': 1}
    """

    _kind_tag: ClassVar[str] = "queue"
    #: What this backend promises: any machine that reaches the server; a dead consumer's
    #: leased item comes back when its lease runs out; a put or get whose connection
    #: drops ends in ``OutcomeUnknownError``; durability is the server's.
    guarantees: ClassVar[Guarantees] = Guarantees(
        backend="redis",
        scope="network",
        holder_death="lease",
        outcome_unknown=True,
        survives="server-memory",
    )

    def __init__(
        self,
        url: str,
        capacity: int,
        maxsize: int | None = None,
        raw: bool = False,
        delivery: str | None = None,
    ) -> None:
        """Use :meth:`open`. (``RedisStructure`` reopens a pickled handle with this.)"""
        capacity = _check_count("capacity", capacity)
        if capacity < MIN_CAPACITY:
            raise ValueError(f"capacity must be at least {MIN_CAPACITY} bytes, got {capacity}")
        if capacity > _MAX_CAPACITY:
            raise ValueError(f"capacity must be at most 2**53 bytes, got {capacity}")
        capacity = (capacity + 7) & ~7
        if maxsize is not None:
            maxsize = _check_count("maxsize", maxsize)
        if delivery is not None:
            if not isinstance(delivery, str):
                raise TypeError(f"delivery must be a str, not {type(delivery).__name__}")
            if delivery not in _DELIVERIES:
                raise ValueError(
                    f"delivery must be 'at-most-once' or 'at-least-once', got {delivery!r}"
                )
        raw = bool(raw)
        # Not RedisStructure.__init__: the keys are checked for foreign data before the
        # kind is claimed, so a failed open changes nothing.
        conn = self._conn = Connection(type(self).__name__, url)
        self._keys = [conn.key(part) for part in _PARTS]
        try:
            found = conn.call(
                lambda c: conn.script(_CHECK_TYPES)(keys=self._keys, args=list(_TYPES)),
                idempotent=True,
            )
            if found != b"ok":
                raise IncompatibleKeyError(f"cannot open {conn.what}: {_text(found)}")
            conn.claim_kind(self._kind_tag, {"capacity": str(capacity), "raw": "1" if raw else "0"})
            options = [
                "maxsize",
                "" if maxsize is None else str(maxsize),
                "0",
                "delivery",
                delivery or "",
                "at-most-once",
            ]
            have = conn.call(
                lambda c: conn.script(_OPTIONS)(keys=[conn.kind_key], args=options),
                idempotent=True,
            )
            if have[0] == b"!":
                raise IncompatibleKeyError(f"cannot open {conn.what}: {_text(have[1])}")
            stored_maxsize, stored_delivery = _text(have[0]), _text(have[1])
            if not stored_maxsize.isdigit() or stored_delivery not in _DELIVERIES:
                raise IncompatibleKeyError(
                    f"cannot open {conn.what}: its parameters say maxsize={stored_maxsize!r}, "
                    f"delivery={stored_delivery!r}: not written by safeshm"
                )
        except BaseException:
            conn.close()
            raise
        self._capacity: int = capacity
        self._maxsize: int = int(stored_maxsize)
        self._raw: bool = raw
        self._delivery: Delivery = cast(Delivery, stored_delivery)
        self._leasing = "1" if stored_delivery == "at-least-once" else "0"
        self._what = f"RedisQueue {conn.name!r}"

    # -- construction ----------------------------------------------------------------------
    @overload
    @classmethod
    def open(
        cls,
        url: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: Literal[False] = False,
        delivery: Delivery | None = None,
    ) -> RedisQueue[Any]: ...
    @overload
    @classmethod
    def open(
        cls,
        url: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: Literal[True],
        delivery: Delivery | None = None,
    ) -> RedisQueue[bytes]: ...
    @overload
    @classmethod
    def open(
        cls,
        url: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: bool,
        delivery: Delivery | None = None,
    ) -> RedisQueue[Any]: ...

    @classmethod
    def open(
        cls,
        url: str,
        capacity: int,
        *,
        maxsize: int | None = None,
        raw: bool = False,
        delivery: Delivery | None = None,
    ) -> RedisQueue[Any]:
        """Open the queue named by ``url`` (``redis://HOST:PORT/DB#NAME``), creating it
        if it does not exist (race-free: the parameters are written with ``HSETNX``).

        An existing queue must be what this call would create, the rule of
        ``SafeQueue.open``: the same ``capacity`` (rounded up to a multiple of 8) and mode
        (``raw``), and the same ``maxsize`` and ``delivery`` if given (``None``: the
        default when creating -- no item limit, at-most-once -- and any when attaching).

        Args:
            url: where and which: ``redis://HOST:PORT/DB#NAME`` (see ``safeshm.redis``).
            capacity: bytes the queue holds at most (at least 16); an item takes its
                pickled size plus 8 to 15 bytes, as in ``SafeQueue``.
            maxsize: if positive, also at most this many items.
            raw: items are ``bytes``, stored as they are (no pickling).
            delivery: ``"at-most-once"`` (``get`` removes the item) or
                ``"at-least-once"`` (also :meth:`get_leased`, with redelivery of items
                whose lease runs out).

        Raises:
            TypeError, ValueError, OverflowError: a bad ``capacity``, ``maxsize`` or
                ``delivery``; a bad URL. Nothing was sent.
            IncompatibleKeyError: the queue exists with other parameters, the name holds
                another kind of structure, or one of the queue's keys holds data safeshm
                did not write; nothing changed.
            BackendUnavailableError: the server could not be reached.
            BackendAuthenticationError: the server refused the credentials.
        """
        return cls(url, capacity, maxsize, raw, delivery)

    def _reopen_args(self) -> tuple[Any, ...]:
        return (self.url, self._capacity, self._maxsize, self._raw, self._delivery)

    # -- properties --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The capacity in bytes (rounded up to a multiple of 8)."""
        return self._capacity

    @property
    def maxsize(self) -> int:
        """The item limit (0: only the capacity limits the queue)."""
        return self._maxsize

    @property
    def raw(self) -> bool:
        """Whether items are ``bytes`` passed through unpickled."""
        return self._raw

    @property
    def delivery(self) -> Delivery:
        """``"at-most-once"`` or ``"at-least-once"`` (leases available)."""
        return self._delivery

    def qsize(self) -> int:
        """The number of queued items (a snapshot; leased items are not counted)."""
        n = self._conn.call(lambda c: c.llen(self._keys[0]), idempotent=True)
        return int(n)

    def empty(self) -> bool:
        """Whether no item is queued (a snapshot)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Whether no further item would fit right now (a snapshot)."""
        s = self.statistics()
        if self._maxsize and s.items + s.leased >= self._maxsize:
            return True
        return self._capacity - s.bytes_used < _need(0)

    def statistics(self) -> RedisQueueStatistics:
        """A consistent snapshot for monitoring (one read-only script)."""
        items, used, leased, getters, putters = self._conn.call(
            lambda c: self._conn.script(_STATS)(keys=self._keys), idempotent=True
        )
        return RedisQueueStatistics(
            name=self.name,
            items=int(items),
            bytes_used=int(used),
            capacity=self._capacity,
            maxsize=self._maxsize,
            raw=self._raw,
            delivery=self._delivery,
            leased=int(leased),
            waiting_getters=int(getters),
            waiting_putters=int(putters),
        )

    # -- put -----------------------------------------------------------------------------------
    def put(self, item: T, block: bool = True, timeout: float | None = None) -> None:
        """Put ``item`` at the end of the queue, waiting for room if needed.

        Args:
            item: any picklable object (``bytes`` or another bytes-like object for a raw
                queue).
            block: wait for room; if false, raise ``queue.Full`` at once instead.
            timeout: with ``block``, wait at most this many seconds (``None``: forever).

        Raises:
            queue.Full: no room within the timeout (or at once, without ``block``).
            ValueError: the item can never fit (larger than the capacity allows); a
                negative timeout. Nothing was sent.
            pickle.PicklingError, TypeError, ...: the item could not be pickled (or is not
                bytes, for a raw queue); nothing was sent.
            OutcomeUnknownError: the connection dropped after the put was sent: the item
                was queued once, or not at all.
            BackendUnavailableError: the server could not be reached; nothing was put.
        """
        data = self._encode(item)
        deadline = _deadline(block, timeout)
        if _need(len(data)) > self._capacity:
            raise ValueError(
                f"{self._what}: an item of {len(data)} bytes"
                f"{'' if self._raw else ' (pickled)'} can never fit a {self._capacity}-byte "
                f"queue (the largest is {self._capacity - 8} bytes); nothing was put"
            )
        self._put([data], deadline)

    def put_nowait(self, item: T) -> None:
        """``put(item, block=False)``."""
        self.put(item, False)

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put all ``items`` at the end of the queue at once: consumers see all or none of
        them, in order, with no other producer's items in between (one script).

        Raises:
            queue.Full: not enough room for all of them within the timeout; none was put.
            ValueError: the batch can never fit (more bytes than the capacity allows, or
                more items than ``maxsize``); none was put.
            OutcomeUnknownError: the connection dropped after the batch was sent: all of
                it was put, or none.
        """
        deadline = _deadline(block, timeout)
        datas = [self._encode(item) for item in items]
        if not datas:
            return
        total = sum(_need(len(d)) for d in datas)
        if total > self._capacity:
            raise ValueError(
                f"{self._what}: a batch of {len(datas)} items needs {total} bytes, which can "
                f"never fit the {self._capacity}-byte queue; nothing was put"
            )
        if self._maxsize and len(datas) > self._maxsize:
            raise ValueError(
                f"{self._what}: a batch of {len(datas)} items exceeds maxsize "
                f"{self._maxsize}; nothing was put"
            )
        self._put(datas, deadline)

    def _put(self, datas: list[bytes], deadline: float | None) -> None:
        args: list[Any] = ["", "", self._capacity, self._maxsize, *datas]
        if not self._run(_PUT, args, deadline, "putters", _put_done):
            raise queue.Full

    # -- get -----------------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return the item at the front of the queue, waiting for one if needed.

        In at-least-once mode, items whose lease ran out are put back at the front first
        (with a :class:`~safeshm.HolderDiedWarning`), and this get is at-most-once itself.

        Raises:
            queue.Empty: no item within the timeout (or at once, without ``block``).
            ValueError: a negative timeout.
            ItemDecodeError: the item was taken but could not be unpickled here; its
                pickled bytes are on the exception (``undecodable``).
            OutcomeUnknownError: the connection dropped after the get was sent: an item
                may have been taken, and is then lost.
        """
        deadline = _deadline(block, timeout)
        _, datas = self._take(1, deadline, "")
        return self._decode(datas)[0]  # type: ignore[no-any-return]

    def get_nowait(self) -> T:
        """``get(block=False)``."""
        return self.get(False)

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[T]:
        """Remove and return up to ``max_items`` items from the front of the queue (one
        script: ``LPOP`` with a count), waiting as :meth:`get` does only until there is at
        least one.

        Raises:
            queue.Empty: no item within the timeout (or at once, without ``block``).
            ValueError: ``max_items`` below 1, or a negative timeout.
            TypeError: ``max_items`` is not an int.
            ItemDecodeError: some of the items taken could not be unpickled: the others
                are on the exception (``items``), with the bytes of these
                (``undecodable``).
            OutcomeUnknownError: as :meth:`get` (a whole batch may be lost).
        """
        if isinstance(max_items, bool) or not isinstance(max_items, int):
            raise TypeError(f"max_items must be an int, not {type(max_items).__name__}")
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        deadline = _deadline(block, timeout)
        _, datas = self._take(max_items, deadline, "")
        return self._decode(datas)

    def _take(self, n: int, deadline: float | None, lease: str) -> tuple[int, list[bytes]]:
        """Run the get script until it takes something or ``deadline`` passes: (lease id,
        the items' bytes)."""
        args: list[Any] = ["", "", n, lease, self._leasing]
        reply = self._run(_GET, args, deadline, "getters", self._got)
        if len(reply) <= 3:
            raise queue.Empty
        return int(reply[1]), reply[3:]

    def _got(self, reply: Any) -> bool:
        """Whether a get script's reply took something (and warn about redeliveries)."""
        if int(reply[0]):
            self._warn_redelivered(int(reply[0]))
        return len(reply) > 3

    # -- waiting ---------------------------------------------------------------------------------
    def _run(
        self,
        source: str,
        args: list[Any],
        deadline: float | None,
        room: Literal["getters", "putters"],
        done: Callable[[Any], bool],
    ) -> Any:
        """Run a put or get script until ``done(reply)`` or ``deadline`` (``None``: one
        try); the last reply.

        Between tries the caller waits in the server: one pipeline of ``BLPOP`` on its
        direction's token list and the script again, so that the try after a wake-up
        runs in the same server turn as the wake-up, with no further round trip. The
        script registers the caller in the waiting room while it waits (``args[0:2]``,
        see ``_REGISTER``) and renews the registration at each try.
        """
        conn = self._conn
        script = conn.script(source)
        keys = self._keys
        waiter = args[0] = _waiter_id(deadline)
        args[1] = "first"
        reply = conn.call(lambda c: script(keys=keys, args=args), idempotent=False)
        tokens = keys[3] if room == "getters" else keys[5]
        while not done(reply) and deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._unregister(waiter, room)
                break
            wait = min(left, _SLICE)
            if room == "getters" and int(reply[2]) >= 0:
                # Wake up when the next lease runs out: its item comes back then.
                wait = min(wait, int(reply[2]) / 1000 + _MIN_WAIT)
            last = wait >= left
            args[1] = "last" if last else "again"
            reply = self._wait_and_run(script, tokens, wait, args)
            if last:
                done(reply)
                break
        return reply

    def _wait_and_run(self, script: Any, tokens: str, seconds: float, args: list[Any]) -> Any:
        """``BLPOP tokens`` for up to ``seconds``, then the script: one pipeline (on a
        Cluster, where redis-py pipelines no scripts, two commands)."""
        seconds = max(_MIN_WAIT, math.ceil(seconds * 1000) / 1000)
        keys = self._keys
        conn = self._conn

        def run(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            pipe.blpop([tokens], timeout=seconds)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            woken, reply = pipe.execute(raise_on_error=False)
            if isinstance(reply, rex.NoScriptError):  # not run (a restarted server)
                reply = script(keys=keys, args=args)
            for r in (woken, reply):
                if isinstance(r, Exception):
                    raise r
            return reply

        try:
            if not conn.cluster:
                return conn.call(run, idempotent=False)
            try:
                # Only a wake-up token is at stake: a dropped connection is retried once.
                conn.call(lambda c: c.blpop([tokens], timeout=seconds), idempotent=True)
            except OutcomeUnknownError as exc:
                raise BackendUnavailableError(
                    f"{self._what}: the connection failed while waiting ({exc}); nothing "
                    "was taken or put"
                ) from None
            return conn.call(lambda c: script(keys=keys, args=args), idempotent=False)
        except (SafeShmError, *_CUT_SHORT):
            if conn.closed:  # closed by another thread while this one waited
                conn.check_open()
            raise

    def _unregister(self, waiter: str, room: str) -> None:
        """Drop a waiter's registration (it gave up); it would lapse by itself anyway."""
        if not waiter:
            return
        conn = self._conn
        which = "3" if room == "getters" else "5"
        with contextlib.suppress(SafeShmError):
            conn.call(
                lambda c: conn.script(_UNREGISTER)(keys=self._keys, args=[waiter, which]),
                idempotent=True,
            )

    # -- at-least-once consumption ---------------------------------------------------------------
    def get_leased(
        self, timeout: float | None = None, *, lease: float = 30.0
    ) -> tuple[T, RedisLease]:
        """Take the item at the front with a lease (``SafeQueue.get_leased``'s API): it is
        delivered again, at the front, if ``lease`` seconds pass before
        :meth:`RedisLease.ack` -- whether its consumer died, hung, or is still working.
        ``math.inf`` (or anything from ``threading.TIMEOUT_MAX`` up): never expires.

        The lease's deadline is counted by the server's clock from the moment it takes the
        item. The item keeps counting against the capacity until it is acknowledged.

        Returns:
            ``(item, lease)``; call ``lease.ack()`` once the item is handled.

        Raises:
            queue.Empty: no item within ``timeout`` (``None``: wait forever; 0: at once).
            ValueError: a negative or NaN ``lease``/``timeout``; the queue's delivery is
                at-most-once.
            ItemDecodeError: the item could not be unpickled here; its bytes are on the
                exception, and it stays leased: it is delivered again when the lease runs
                out (perhaps to a process that can unpickle it).
            OutcomeUnknownError: the connection dropped after the get was sent: if it took
                an item, the item comes back when the lease runs out.
        """
        seconds = check_timeout(lease)
        if seconds is None or seconds <= 0:
            raise ValueError(f"lease must be a positive number of seconds, got {lease!r}")
        if self._delivery != "at-least-once":
            raise ValueError(
                f"{self._what} delivers at most once: open it with delivery='at-least-once' "
                "to lease items"
            )
        wait = check_timeout(timeout)
        deadline = _NEVER if wait is None else time.monotonic() + wait
        ms = "inf" if seconds == _NEVER else str(max(1, math.ceil(seconds * 1000)))
        lease_id, datas = self._take(1, deadline, ms)
        handle = RedisLease(self, lease_id)
        (item,) = self._decode(datas)
        return item, handle

    @contextlib.contextmanager
    def leased(self, timeout: float | None = None, *, lease: float = 30.0) -> Iterator[T]:
        """``with q.leased() as item:`` -- :meth:`get_leased`, acknowledged when the block
        ends normally; on an exception the item is released at once (delivered again, at
        the front) and the exception propagates."""
        item, handle = self.get_leased(timeout, lease=lease)
        try:
            yield item
        except BaseException:
            handle.release()
            raise
        handle.ack()

    def reclaim_leases(self) -> int:
        """Put back now, at the front, the items whose lease ran out (every get does this
        first); how many. Warns :class:`~safeshm.HolderDiedWarning` if any."""
        n = int(
            self._conn.call(lambda c: self._conn.script(_RECLAIM)(keys=self._keys), idempotent=True)
        )
        if n:
            self._warn_redelivered(n)
        return n

    def _end_lease(self, lease_id: int, *, redeliver: bool) -> None:
        done = self._conn.call(
            lambda c: self._conn.script(_END_LEASE)(
                keys=self._keys, args=[lease_id, "release" if redeliver else "ack"]
            ),
            idempotent=False,
        )
        if not done:
            raise LeaseExpiredError(
                f"{self._what}: lease {lease_id} ended before this "
                f"{'release' if redeliver else 'ack'} (it ran out and its item was delivered "
                "again, or it was acknowledged or released already): nothing was changed"
            )

    def _warn_redelivered(self, n: int) -> None:
        warnings.warn(
            f"{self._what}: {n} leased item(s) whose lease ran out without an ack are "
            "delivered again, at the front (their consumer died, hung, or is still "
            "running past its lease)",
            HolderDiedWarning,
            stacklevel=user_stacklevel(),
        )

    # -- encoding ---------------------------------------------------------------------------
    def _encode(self, item: Any) -> bytes:
        if not self._raw:
            return pickle.dumps(item, _PROTOCOL)
        if type(item) is bytes:
            return item
        if not isinstance(item, bytes | bytearray | memoryview):
            raise TypeError(f"a raw RedisQueue carries bytes, not {type(item).__name__}")
        try:
            return memoryview(item).cast("B").tobytes()
        except TypeError:
            raise TypeError("a raw RedisQueue needs a C-contiguous bytes-like item") from None

    def _decode(self, datas: list[bytes]) -> list[Any]:
        if self._raw:
            return datas
        out: list[Any] = []
        failed: list[bytes] = []
        failed_at: list[int] = []
        first: Exception | None = None
        for k, data in enumerate(datas):
            try:
                out.append(pickle.loads(data))  # noqa: S301 - the documented default
            except Exception as e:  # noqa: BLE001 - re-raised below, with the batch
                failed.append(data)
                failed_at.append(k)
                first = first or e
        if first is not None:
            raise ItemDecodeError(
                f"{len(failed)} of {len(datas)} item(s) taken from {self._what} could not be "
                f"unpickled (first: {type(first).__name__}: {first}); they are off the "
                "queue: the pickled bytes are in .undecodable"
                + (f", the {len(out)} other item(s) in .items" if out else ""),
                out,
                failed,
                failed_at,
            ) from first
        return out

    # -- lifecycle ------------------------------------------------------------------------------
    def unlink(self) -> None:
        """Delete the queue (every key under its name) for everyone; also from a closed
        handle (as ``SafeQueue.unlink()`` works after ``close()``). Handles still open
        go on using the name with their own parameters; the next :meth:`open` creates
        it again."""
        if not self._conn.closed:
            self._conn.delete_all()
            return
        temporary = Connection(type(self).__name__, self.url)
        try:
            temporary.delete_all()
        finally:
            temporary.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        extra = (", raw=True" if self._raw else "") + (
            ", delivery='at-least-once'" if self._delivery == "at-least-once" else ""
        )
        return (
            f"<RedisQueue {self.name!r} at {_redact(self.url)} capacity={self._capacity}"
            f"{extra} ({state})>"
        )


class RedisLease:
    """The acknowledgement handle of an item taken with :meth:`RedisQueue.get_leased`
    (``safeshm.Lease``'s API)."""

    __slots__ = ("_ended", "_id", "_q")

    def __init__(self, q: RedisQueue[Any], lease_id: int) -> None:
        self._q = q
        self._id = lease_id
        self._ended = ""  # "ack" or "release" once this handle ended it

    @property
    def lease_id(self) -> int:
        """The lease's id (unique in its queue, increasing in the order items were
        taken)."""
        return self._id

    def ack(self) -> None:
        """The item is handled: it is never delivered again.

        A lease that ran out can still be acknowledged until a get or a reclaim of some
        consumer has put its item back.

        Raises:
            LeaseExpiredError: the lease had ended (its item was delivered again, or it
                was acknowledged or released already); nothing changed.
            OutcomeUnknownError: the connection dropped after the ack was sent: if it was
                not applied, the item is delivered again when the lease runs out.
        """
        self._end(redeliver=False)

    def release(self) -> None:
        """Give the item back now: it is delivered again at the front of the queue.

        Raises:
            LeaseExpiredError: as :meth:`ack`.
        """
        self._end(redeliver=True)

    def _end(self, *, redeliver: bool) -> None:
        doing = "release" if redeliver else "ack"
        if self._ended:
            raise LeaseExpiredError(
                f"RedisQueue {self._q.name!r}: lease {self._id} was already ended by "
                f"{self._ended}() on this handle; this {doing}() changed nothing"
            )
        self._q._end_lease(self._id, redeliver=redeliver)
        self._ended = doing

    def __repr__(self) -> str:
        return f"<safeshm.redis.RedisLease {self._id} of {self._q.name!r}>"


def _put_done(reply: Any) -> bool:
    return bool(reply)


def _deadline(block: bool, timeout: float | None) -> float | None:
    """``None`` for "do not wait", ``math.inf`` for "wait forever", else a monotonic time.

    The timeout is checked even when ``block`` is false, as ``SafeQueue`` does.
    """
    seconds = check_timeout(timeout)
    if not block:
        return None
    return _NEVER if seconds is None else time.monotonic() + seconds


def _waiter_id(deadline: float | None) -> str:
    """A fresh waiter id for a call that may wait; '' (never registers) for one that
    cannot (no blocking, or a timeout of 0)."""
    if deadline is None or deadline <= time.monotonic():
        return ""
    return os.urandom(8).hex()


def _text(reply: Any) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
