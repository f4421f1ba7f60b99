"""RedisCounter (one exact int64 on a Redis server) and FleetCounter (a sharded counter
for fleets: each host counts in shared memory and publishes its total).

Keys, for a counter named ``NAME`` (all under the hash tag ``{NAME}``, so a Cluster keeps
them on one node):

* ``safeshm:{NAME}``: the kind (``counter`` or ``fleet-counter``), written at open;
* ``safeshm:{NAME}:value``: ``RedisCounter``'s value, a Redis integer string;
* ``safeshm:{NAME}:hosts``: ``FleetCounter``'s hash of published totals, one field per
  host and shared-memory lifetime (``<host-id>/<epoch>``), plus ``@initial``;
* ``safeshm:{NAME}:flushed``: ``FleetCounter``'s hash of the sequence number of each
  field's last accepted flush (an older flush never overwrites a newer one).
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import os
import socket
import threading
import time
import urllib.parse
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Self

import redis.exceptions as rex

from safeshm._counter import SafeCounter
from safeshm._errors import IncompatibleKeyError, SafeShmWarning, SegmentNotFoundError
from safeshm._int64 import INT64_MAX, INT64_MIN, check_int64
from safeshm._protocols import Guarantees
from safeshm._segment import NAME_MAX, validate_name
from safeshm._sharded import ShardedCounter

from ._core import Connection, RedisStructure, parse_url

__all__ = ["FleetCounter", "RedisCounter"]

# The widest delta whose result can still be an int64 (from INT64_MIN to INT64_MAX).
_WIDEST: Final = INT64_MAX - INT64_MIN

# KEYS: keys that must be absent or of the type in the same position of ARGV. Read-only:
# run before the kind is claimed, so a foreign key under the name changes nothing at all.
_CHECK_TYPES: Final = """
for i = 1, #KEYS do
    local t = redis.call('TYPE', KEYS[i])['ok']
    if t ~= 'none' and t ~= ARGV[i] then
        return 'the key ' .. KEYS[i] .. ' holds a Redis ' .. t .. ', expected a ' .. ARGV[i]
    end
end
return 'ok'
"""

# KEYS[1] the value; ARGV[1] the initial value. Creates the value if missing (the first
# opener's initial wins), checks that an existing one is a Redis integer.
_INIT_VALUE: Final = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
    redis.call('SET', KEYS[1], ARGV[1])
    return 'ok'
end
if t ~= 'string' then
    return 'the key ' .. KEYS[1] .. ' holds a Redis ' .. t .. ', not an integer string'
end
local v = redis.call('GET', KEYS[1])
local digits = v
if string.sub(v, 1, 1) == '-' then digits = string.sub(v, 2) end
local limit = '9223372036854775807'
if string.sub(v, 1, 1) == '-' then limit = '9223372036854775808' end
if string.match(digits, '^%d+$') == nil or (#digits > 1 and string.sub(digits, 1, 1) == '0')
    or #digits > #limit or (#digits == #limit and digits > limit) then
    return 'the key ' .. KEYS[1] .. ' holds ' .. string.sub(v, 1, 40) .. ', not an int64'
end
return 'ok'
"""

# KEYS[1] the value; ARGV[1] expected, ARGV[2] new (canonical decimal strings: what
# str(int) writes and INCRBY keeps). A missing value reads as 0, as INCRBY treats it.
_COMPARE_AND_SET: Final = """
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '0' end
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# A delta outside int64 whose result may still be one (the counter far on the other
# side of zero): INCRBY takes int64 arguments only, so the delta goes in same-sign int64
# chunks (every partial sum lies between the old and the new value). KEYS[1] the value;
# ARGV: n chunks, then their n negations. A chunk that fails undoes the ones before it,
# inside the script (atomic: nobody sees the partial sums), and the script returns the
# error: nothing changed.
_ADD_WIDE: Final = """
local n = #ARGV / 2
for i = 1, n do
    local r = redis.pcall('INCRBY', KEYS[1], ARGV[i])
    if type(r) == 'table' and r.err then
        for j = i - 1, 1, -1 do redis.call('INCRBY', KEYS[1], ARGV[n + j]) end
        return r
    end
end
return redis.call('GET', KEYS[1])
"""


def _delta(delta: Any) -> int:
    try:
        return operator.index(delta)  # int, bool, numpy integers; not float, not str
    except TypeError:
        raise TypeError(f"delta must be an int, not {type(delta).__name__}") from None


def _to_int(raw: Any, what: str) -> int:
    """A Redis integer reply or string as an int; a foreign value is a typed error."""
    if raw is None:
        return 0
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise IncompatibleKeyError(
            f"{what} holds {raw!r:.60}, not an integer: not written by safeshm"
        ) from None


def _check_types(conn: Connection, expected: Mapping[str, str]) -> None:
    """Raise IncompatibleKeyError if one of the keys holds another Redis type."""
    keys = list(expected)
    types = list(expected.values())
    found = conn.call(lambda c: conn.script(_CHECK_TYPES)(keys=keys, args=types), idempotent=True)
    if found != b"ok":
        raise IncompatibleKeyError(f"cannot open {conn.what}: {_text(found)}")


def _text(reply: Any) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)


def _unlink_keys(handle: RedisStructure) -> None:
    """Delete every key of the structure, also from a closed handle (as
    ``SafeCounter.unlink()`` works after ``close()``): a short-lived connection then."""
    conn: Connection = handle._conn
    if not conn.closed:
        conn.delete_all()
        return
    temporary = Connection(type(handle).__name__, handle.url)
    try:
        temporary.delete_all()
    finally:
        temporary.close()


# KEYS[1] the value; ARGV[1] the new value. Returns the old value (nil: none), or the old
# text unchanged when it is not an int64 (the caller raises), having changed nothing.
_EXCHANGE: Final = """
local old = redis.call('GET', KEYS[1])
if old and (not string.match(old, '^-?%d+$') or #old > 20) then
    return old
end
redis.call('SET', KEYS[1], ARGV[1])
return old
"""


class RedisCounter(RedisStructure):
    """A signed 64-bit integer on a Redis server, shared by processes on any machine.

    The same operations and errors as :class:`safeshm.SafeCounter`, each one Redis
    command (or one Lua script), so each is atomic and linearizable at the server:
    ``add`` is ``INCRBY``, ``set`` is ``SET``, ``exchange`` is ``SET ... GET``
    (Redis 6.2 or later), ``compare_and_set`` a script. Leaving the int64 range raises
    ``OverflowError`` and changes nothing; a non-int operand raises ``TypeError`` before
    anything is sent.

    What only a network can do, and what it means here:

    * :class:`~safeshm.OutcomeUnknownError` from ``add()``, ``exchange()`` or
      ``compare_and_set()``: the connection dropped after the command was sent, so it
      was applied once or not at all. None of them is ever retried automatically (an
      ``INCRBY`` sent twice would count twice); read ``value`` to find out.
    * :class:`~safeshm.BackendUnavailableError`: the server could not be reached; nothing
      was applied. ``value`` and ``set()`` are idempotent: a dropped connection is retried
      once on a fresh one before either error is raised. The next call reconnects.
    * Durability is the server's: every acknowledged write survives a server crash only
      when the server runs with ``appendonly yes`` and ``appendfsync always``; with
      ``appendfsync everysec`` (the usual setting) a crash may lose the last second of
      writes, with snapshots only, everything since the last snapshot. Hence
      ``guarantees.survives == "server-memory"``: safeshm cannot know the server's
      configuration, so it promises only what every configuration keeps.
    * After :meth:`unlink` (by any process) the counter reads 0, and handles still open
      count on from 0, as Redis treats a missing integer; the next :meth:`open`
      re-creates it with its ``initial``.

    ``value`` is one round trip: a few tens of microseconds on loopback, where
    ``SafeCounter.value`` takes tens of nanoseconds. For write-heavy metrics on many
    hosts, :class:`FleetCounter` adds at shared-memory speed.

    Example:
        >>> hits = RedisCounter.open("redis://localhost:6379/0#hits")  # doctest: +SKIP
        >>> hits.add()  # doctest: +SKIP
        1
    """

    _kind_tag: ClassVar[str] = "counter"
    #: What this backend promises: any machine that reaches the server; an ``add`` whose
    #: connection drops ends in ``OutcomeUnknownError``; durability is the server's
    #: (see the class docs).
    guarantees: ClassVar[Guarantees] = Guarantees(
        backend="redis",
        scope="network",
        holder_death="n/a",
        outcome_unknown=True,
        survives="server-memory",
    )

    def __init__(self, url: str, initial: int = 0) -> None:
        """Use :meth:`open`. (``RedisStructure`` reopens a pickled handle with this.)"""
        initial = check_int64("initial value", initial)
        # Not RedisStructure.__init__: its kind claim would run before the check that the
        # value key holds no foreign data, and a failed open must change nothing.
        conn = self._conn = Connection(type(self).__name__, url)
        key = self._key = conn.key("value")
        self._what = f"RedisCounter {conn.name!r}"
        try:
            _check_types(conn, {conn.kind_key: "hash", key: "string"})
            conn.claim_kind(self._kind_tag)
            found = conn.call(
                lambda c: conn.script(_INIT_VALUE)(keys=[key], args=[initial]), idempotent=True
            )
            if found != b"ok":
                raise IncompatibleKeyError(f"cannot open {conn.what}: {_text(found)}")
        except BaseException:
            conn.close()
            raise

    @classmethod
    def open(cls, url: str, initial: int = 0) -> Self:
        """Open the counter named by ``url`` (``redis://HOST:PORT/DB#NAME``), creating it
        with ``initial`` if it does not exist.

        Race-free: ``initial`` is written with ``SET NX``, so when many processes open a
        new counter at once exactly one value is written (one opener's ``initial``) and
        no add can come before it.

        Raises:
            TypeError, OverflowError: ``initial`` is not an int64; nothing was sent.
            ValueError: ``url`` is not a Redis URL or names no counter (``#NAME``).
            IncompatibleKeyError: the name holds another kind of safeshm structure, or a
                key of the counter holds data safeshm did not write; nothing changed.
            BackendUnavailableError: the server could not be reached.
            BackendAuthenticationError: the server refused the credentials.
        """
        return cls(url, initial)

    def _reopen_args(self) -> tuple[Any, ...]:
        return (self.url,)

    # -- operations --------------------------------------------------------------------------
    @property
    def value(self) -> int:
        """The current value (one ``GET``; retried once on a dropped connection)."""
        key = self._key
        return _to_int(self._conn.call(lambda c: c.get(key), idempotent=True), self._what)

    def add(self, delta: int = 1) -> int:
        """Atomically add ``delta`` (may be negative) and return the new value.

        Not idempotent, so never retried: a dropped connection after sending raises
        :class:`~safeshm.OutcomeUnknownError` (applied once or not at all).

        Raises:
            OverflowError: the result would leave the int64 range; nothing changed.
            TypeError: ``delta`` is not an int; nothing was sent.
            OutcomeUnknownError: the connection dropped after the ``INCRBY`` was sent.
            BackendUnavailableError: the server could not be reached; nothing changed.
        """
        d = _delta(delta)
        if not INT64_MIN <= d <= INT64_MAX:
            return self._add_wide(d)
        key = self._key

        def incrby(c: Any) -> int:
            try:
                return int(c.incrby(key, d))
            except rex.ResponseError as exc:
                raise self._refused(exc, d) from None

        return self._conn.call(incrby, idempotent=False)

    def _add_wide(self, d: int) -> int:
        if not -_WIDEST <= d <= _WIDEST:
            raise self._overflow(d)
        step = INT64_MAX if d > 0 else -INT64_MAX
        chunks: list[int] = []
        rest = d
        while rest:
            part = step if abs(rest) > INT64_MAX else rest
            chunks.append(part)
            rest -= part
        args = [*chunks, *(-c for c in chunks)]
        key = self._key

        def run(c: Any) -> int:
            try:
                return _to_int(self._conn.script(_ADD_WIDE)(keys=[key], args=args), self._what)
            except rex.ResponseError as exc:
                raise self._refused(exc, d) from None

        return self._conn.call(run, idempotent=False)

    def set(self, value: int) -> None:
        """Atomically replace the value. Idempotent: retried once on a dropped connection.

        Raises:
            OverflowError, TypeError: ``value`` is not an int64; nothing was sent.
            IncompatibleKeyError: the value key holds another Redis type; nothing changed.
            BackendUnavailableError, OutcomeUnknownError: the server could not be reached
                (nothing changed), or the retry's connection dropped too (set or not).
        """
        value = check_int64("value", value)
        key = self._key
        # A script, not a plain SET: a plain SET replaces a key of any type or text; the
        # script refuses (WRONGTYPE, or a value that is not an integer) and changes nothing.
        old = self._conn.call(
            lambda c: self._conn.script(_EXCHANGE)(keys=[key], args=[value]), idempotent=True
        )
        _to_int(old, self._what)

    def exchange(self, value: int) -> int:
        """Atomically replace the value and return the previous one (one script).

        Not idempotent (a repeat would return the new value as the old one): never
        retried.

        Raises:
            OverflowError, TypeError: ``value`` is not an int64; nothing was sent.
            OutcomeUnknownError: the connection dropped after sending.
            BackendUnavailableError: the server could not be reached; nothing changed.
        """
        value = check_int64("value", value)
        key = self._key
        old = self._conn.call(
            lambda c: self._conn.script(_EXCHANGE)(keys=[key], args=[value]), idempotent=False
        )
        return _to_int(old, self._what)

    def compare_and_set(self, expected: int, new: int) -> bool:
        """Atomically set the value to ``new`` if it equals ``expected`` (one script).

        Not idempotent (a repeat after success would report ``False``): never retried.

        Returns:
            ``True`` if the value was ``expected`` and is now ``new``; ``False`` (and
            nothing changed) otherwise.

        Raises:
            OverflowError, TypeError: ``expected`` or ``new`` is not an int64; nothing
                was sent.
            OutcomeUnknownError: the connection dropped after sending.
            BackendUnavailableError: the server could not be reached; nothing changed.
        """
        expected = check_int64("expected", expected)
        new = check_int64("new", new)
        conn, key = self._conn, self._key
        done = conn.call(
            lambda c: conn.script(_COMPARE_AND_SET)(keys=[key], args=[expected, new]),
            idempotent=False,
        )
        return bool(done)

    def unlink(self) -> None:
        """Delete the counter for everyone. Idempotent; works on a closed handle too."""
        _unlink_keys(self)

    # -- errors ------------------------------------------------------------------------------
    def _overflow(self, d: int) -> OverflowError:
        return OverflowError(
            f"{self._what}: adding {d} would leave the int64 range; nothing was changed"
        )

    def _refused(self, exc: rex.ResponseError, d: int) -> Exception:
        """The typed error for a command the server refused (an INCRBY's own errors)."""
        text = str(exc)
        if "would overflow" in text:
            return self._overflow(d)
        if "not an integer" in text:
            return IncompatibleKeyError(
                f"{self._what}: the value key holds something that is not an int64 "
                f"(not written by safeshm); nothing was changed"
            )
        return exc  # Connection.call translates the rest (WRONGTYPE, NOAUTH, ...)


# -- FleetCounter --------------------------------------------------------------------------

_INITIAL_FIELD: Final = "@initial"

# KEYS[1] the hosts hash, KEYS[2] the flushed hash; ARGV[1] the field, ARGV[2] the total,
# ARGV[3] the flush's sequence number (a decimal string, compared as a number of any
# size: Lua's numbers are doubles). An older flush never overwrites a newer one.
_PUBLISH: Final = """
local have = redis.call('HGET', KEYS[2], ARGV[1])
local seq = ARGV[3]
if have and (#have > #seq or (#have == #seq and have >= seq)) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], seq)
return 1
"""

# A periodic flush is skipped when another process of this host flushed less than this
# share of the interval ago; flusher threads wake every half interval. So a flush happens
# at most every half interval per host, and an add is published within one interval.
_TICK_SHARE: Final = 0.5
_SKIP_SHARE: Final = 0.45
# An explicit flush that keeps losing the host's flush gate to other flushers this many
# times publishes anyway (see FleetCounter._flush).
_FLUSH_TRIES: Final = 100
_JOIN_TIMEOUT: Final = 15.0

_live_fleets: weakref.WeakSet[FleetCounter] = weakref.WeakSet()


def _restart_flushers_after_fork() -> None:
    # Threads do not survive fork: a child that inherited open handles gets its own
    # flusher threads (and events: the parent's may have been mid-use).
    for fleet in list(_live_fleets):
        if not fleet.closed:
            fleet._start_flusher()


os.register_at_fork(after_in_child=_restart_flushers_after_fork)


def _flusher(ref: weakref.ref[FleetCounter], stop: threading.Event, tick: float) -> None:
    """The flusher thread's loop. It holds the handle weakly, so a handle dropped
    without ``close()`` is still collected (the thread then ends at its next tick)."""
    while not stop.wait(tick):
        fleet = ref()
        if fleet is None or fleet.closed:
            return
        fleet._flush_quietly()
        del fleet


def _default_local_name(name: str, url: str) -> str:
    """``fleet.<NAME>.<server>``: the server part (a digest of the URL's scheme, address
    and database, without credentials or options) keeps the fleet counters of one name
    on two servers, or two databases, from sharing one local counter (each would then
    publish the other's adds)."""
    parts = urllib.parse.urlsplit(parse_url(url)[0])
    where = f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"
    server = hashlib.blake2b(where.encode(), digest_size=4).hexdigest()
    local = f"fleet.{name}.{server}"
    if len(local) + len(".flush") <= NAME_MAX:
        return local
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return f"fleet.{name[:24]}.{digest}.{server}"


class FleetCounter(RedisStructure):
    """A write-heavy counter for a fleet of hosts: adds at shared-memory speed, the
    total on Redis.

    Each host counts in a shared-memory :class:`~safeshm.ShardedCounter` (named
    ``fleet.<NAME>.<server digest>`` unless ``local_name=`` says otherwise), shared by
    every process of the host that opens the fleet counter, so ``add()`` never touches the network.
    Every ``flush_interval`` seconds a daemon thread publishes the host's **absolute**
    total into one field of a Redis hash; ``value`` is the sum of the fields (and the
    ``initial`` value). A retried publish writes the same absolute total again, so it can
    never count twice. Only one process per host needs to flush; any may: a flush gate in
    shared memory (a ``SafeCounter`` named ``<local name>.flush``) lets one process flush
    per half interval and orders the flushes, and the server refuses a flush older than
    the one it has, so the published total never goes back to an older reading.

    What it promises, plainly:

    * **Staleness**: ``value`` lags each host's adds by at most about one
      ``flush_interval`` (plus the time a flush takes), while the host's flushes reach the
      server. :meth:`flush` publishes at once; :meth:`close` flushes.
    * **A host that dies** (power loss, kernel panic) loses the adds it made since its
      last flush: they were only in its memory. A process that exits loses nothing: its
      adds stay in the host's shared memory, and the next flush by any process of the
      host publishes them -- as long as one runs before the host reboots.
    * **A host that reboots** starts a new shared-memory counter at zero. Its field is
      named after the host *and* the shared-memory counter's creation (``<host-id>/
      <epoch>``), so the new counter publishes into a new field and the old field keeps
      the previous boot's published total: the value never drops at a reboot. One field
      per reboot accumulates (a few bytes each).
    * **The server**: if it loses data (a crash without ``appendfsync always``), every
      live host republishes its total at its next flush, so the value recovers, except
      for dead hosts' fields and ``initial``.
    * Flush failures never raise into the application: the flusher thread keeps the error
      in :attr:`last_flush_error`, warns once (a :class:`~safeshm.SafeShmWarning`) and
      retries at the next tick. An explicit :meth:`flush` raises.
    * ``add(delta)`` accepts negative deltas, as ``ShardedCounter`` does; there is no
      ``set``/``exchange`` (no single host can reset the others' totals).

    Processes start a flusher thread when they open the counter (and again in a forked
    child). On Python 3.12+ forking a process that has threads warns
    (``DeprecationWarning``): open the counter in each worker (after the fork), or
    pass it to ``spawn`` workers, which re-open it from its pickle.

    Example:
        >>> requests = FleetCounter.open("redis://redis:6379/0#requests")  # doctest: +SKIP
        >>> requests.add()  # doctest: +SKIP
        >>> requests.value  # as of each host's last flush  # doctest: +SKIP
        1041
    """

    _kind_tag: ClassVar[str] = "fleet-counter"
    #: Any machine that reaches the server; an explicit flush can end in
    #: ``OutcomeUnknownError`` (a republish repairs it); durability is the server's, and
    #: live hosts republish; not exact: the value lags by up to one flush interval.
    guarantees: ClassVar[Guarantees] = Guarantees(
        backend="redis",
        scope="network",
        holder_death="n/a",
        outcome_unknown=True,
        survives="server-memory",
        exact=False,
    )

    last_flush_error: BaseException | None
    """The error of this handle's last failed flush; ``None`` after a flush succeeds."""

    def __init__(
        self,
        url: str,
        initial: int = 0,
        flush_interval: float | None = 1.0,
        host_id: str | None = None,
        local_name: str | None = None,
    ) -> None:
        """Use :meth:`open`. (``RedisStructure`` reopens a pickled handle with this.)"""
        initial = check_int64("initial value", initial)
        if flush_interval is not None:
            if isinstance(flush_interval, bool) or not isinstance(flush_interval, int | float):
                raise TypeError(
                    f"flush_interval must be a number of seconds or None, "
                    f"not {type(flush_interval).__name__}"
                )
            if not 0 < flush_interval < float("inf"):
                raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval}")
        if host_id is not None:
            if not isinstance(host_id, str):
                raise TypeError(f"host_id must be a str, not {type(host_id).__name__}")
            if not host_id or host_id.startswith("@"):
                raise ValueError(f"host_id must be non-empty and not start with '@': {host_id!r}")
        if local_name is not None:
            validate_name(local_name)
            validate_name(f"{local_name}.flush")
        self._options = (initial, flush_interval, host_id, local_name)
        self.last_flush_error = None
        self._flush_interval = flush_interval
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

        conn = self._conn = Connection(type(self).__name__, url)
        self._what = f"FleetCounter {conn.name!r}"
        hosts = self._hosts_key = conn.key("hosts")
        seqs = self._seqs_key = conn.key("flushed")
        local: ShardedCounter | None = None
        gate: SafeCounter | None = None
        try:
            _check_types(conn, {conn.kind_key: "hash", hosts: "hash", seqs: "hash"})
            conn.claim_kind(self._kind_tag)
            conn.call(lambda c: c.hsetnx(hosts, _INITIAL_FIELD, initial), idempotent=True)
            lname = (
                local_name if local_name is not None else _default_local_name(conn.name, conn.url)
            )
            local = ShardedCounter.open(lname)
            gate = SafeCounter.open(f"{lname}.flush")
        except BaseException:
            for h in (gate, local, conn):
                if h is not None:
                    h.close()
            raise
        self._local = local
        self._gate = gate
        header = local._seg.header
        epoch = f"{header.created_ns}-{header.creator_pid}"
        self._host = host_id if host_id is not None else socket.gethostname() or "host"
        self._field = f"{self._host}/{epoch}"
        # The hot path is the local counter's own add (compiled where available): no
        # wrapper, no network, the ShardedCounter's rate.
        self.__dict__["add"] = local.add
        _live_fleets.add(self)
        self._start_flusher()

    @classmethod
    def open(
        cls,
        url: str,
        initial: int = 0,
        *,
        flush_interval: float | None = 1.0,
        host_id: str | None = None,
        local_name: str | None = None,
    ) -> Self:
        """Open the fleet counter named by ``url`` (``redis://HOST:PORT/DB#NAME``),
        creating it with ``initial`` if it does not exist, and this host's local counter.

        Args:
            url: the server and the counter's name.
            initial: added to the sum of the hosts' totals; applies only when this call
                creates the counter.
            flush_interval: seconds between this host's publications (the staleness
                bound); ``None`` starts no flusher thread in this process (call
                :meth:`flush` yourself, or let another process of the host flush).
            host_id: this host's name in the hash; default ``socket.gethostname()``.
                Two hosts with one id do not mix their counts (each field also names the
                shared-memory counter's creation), but a readable, unique id helps. The
                processes of one host must agree on it: two ids publishing one local
                counter's total would count it twice.
            local_name: the name of this host's shared-memory counter (default
                ``fleet.<NAME>.<digest of the server's address and database>``);
                processes of one host must agree on it.

        Raises:
            TypeError, OverflowError, ValueError: a bad argument; nothing was sent.
            IncompatibleKeyError: the name holds another kind of structure or foreign
                data; nothing changed.
            BackendUnavailableError: the server could not be reached.
        """
        return cls(url, initial, flush_interval, host_id, local_name)

    def _reopen_args(self) -> tuple[Any, ...]:
        return (self.url, *self._options)

    # -- the hot path --------------------------------------------------------------------------
    def add(self, delta: int = 1) -> None:
        """Add ``delta`` (may be negative) to this host's count, in shared memory.

        Published at the next flush. (An open handle's ``add`` is the local
        ``ShardedCounter.add`` itself; this method runs only on a closed handle.)

        Raises:
            OverflowError, TypeError: as ``ShardedCounter.add``; nothing changed.
            HandleClosedError: the handle is closed.
        """
        self._conn.check_open()
        self._local.add(delta)

    # -- reads ---------------------------------------------------------------------------------
    @property
    def value(self) -> int:
        """The sum of every host's last published total, plus ``initial`` (one ``HVALS``).

        Stale by up to one flush interval per host; see the class docs.
        """
        key = self._hosts_key
        raw = self._conn.call(lambda c: c.hvals(key), idempotent=True)
        return sum(_to_int(v, self._what) for v in raw)

    @property
    def local_value(self) -> int:
        """This host's total, unpublished adds included (shared memory; no network)."""
        self._conn.check_open()
        return self._local.value

    def hosts(self) -> dict[str, int]:
        """Each host's published total (its fields of every boot summed), by host id."""
        key = self._hosts_key
        raw: dict[bytes, bytes] = self._conn.call(lambda c: c.hgetall(key), idempotent=True)
        out: dict[str, int] = {}
        for field, total in raw.items():
            name = field.decode(errors="replace")
            if name == _INITIAL_FIELD:
                continue
            host = name.rpartition("/")[0] or name
            out[host] = out.get(host, 0) + _to_int(total, self._what)
        return out

    # -- flushing ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Publish this host's total now: every add this host made before the call is in
        ``value`` when it returns.

        Idempotent (an absolute total): a dropped connection is retried once.

        Raises:
            BackendUnavailableError: the server could not be reached; the adds stay in
                shared memory for the next flush.
            OutcomeUnknownError: the retry's connection dropped too (published or not;
                the next flush publishes again).
            HandleClosedError: the handle is closed.
        """
        self._conn.check_open()
        try:
            self._flush(periodic=False)
        except Exception as exc:
            self.last_flush_error = exc
            raise
        self.last_flush_error = None

    def _flush(self, *, periodic: bool) -> bool:
        """One flush through the host's gate; ``False`` if a periodic one was skipped.

        The gate (a SafeCounter shared by the host's processes) holds the sequence number
        of the latest flush to start. A flusher claims the next number with a
        compare-and-set, then reads the local total, then checks that nobody claimed a
        later number meanwhile. Every flusher that passes that check read its total after
        every earlier-numbered flusher that passed it (they read before their check, which
        came before our claim), so a later number always carries a later reading, and the
        server keeps only the highest number: the published total never goes back, even
        when flushes from several processes reach the server out of order.

        A periodic flush gives way (skips) to any other; an explicit one retries until it
        passes, so its own reading -- after every add made before the call -- is
        published.
        """
        gate = self._gate
        min_gap = int((self._flush_interval or 0.0) * _SKIP_SHARE * 1e9)
        for attempt in range(_FLUSH_TRIES):
            now = time.monotonic_ns()
            last = gate.value
            if periodic and now - last < min_gap:
                return False  # another process of this host flushed just now
            seq = max(now, last + 1)
            if gate.compare_and_set(last, seq):
                total = self._local.value
                if gate.value == seq:
                    self._publish(total, seq)
                    return True
            if periodic:
                return False  # another flusher claimed a later number: it publishes
            if attempt >= 3:
                time.sleep(0.0005)  # flushers of other processes are mid-claim: let them
        # Still overtaken after _FLUSH_TRIES tries (other processes flushing explicitly
        # in a tight loop): publish a reading taken now under a number claimed now. The
        # server still keeps the highest number; only this one publish may carry a
        # reading a few microseconds older than a lower-numbered one.
        while True:
            last = gate.value
            seq = max(time.monotonic_ns(), last + 1)
            if gate.compare_and_set(last, seq):
                break
        self._publish(self._local.value, seq)
        return True

    def _publish(self, total: int, seq: int) -> bool:
        """Write ``total`` as this host's field unless a later flush is there already."""
        conn = self._conn
        keys = [self._hosts_key, self._seqs_key]
        args = [self._field, total, seq]
        done = conn.call(lambda c: conn.script(_PUBLISH)(keys=keys, args=args), idempotent=True)
        return bool(done)

    def _flush_quietly(self) -> None:
        """The flusher thread's flush: never raises, remembers and reports failures."""
        try:
            self._flush(periodic=True)
        except Exception as exc:  # noqa: BLE001 - a background thread must not die
            first = self.last_flush_error is None
            self.last_flush_error = exc
            if first:
                # Once per streak of failures. A warnings filter that turns it into an
                # error must not end the thread either.
                with contextlib.suppress(Exception):
                    warnings.warn(
                        SafeShmWarning(
                            f"{self._what}: publishing this host's total failed ({exc}); "
                            "the adds stay in shared memory and the flush is retried"
                        ),
                        stacklevel=1,
                    )
        else:
            self.last_flush_error = None

    def _start_flusher(self) -> None:
        if self._flush_interval is None:
            return
        stop = self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_flusher,
            args=(weakref.ref(self), stop, self._flush_interval * _TICK_SHARE),
            name=f"safeshm-flush-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def _stop_flusher(self) -> None:
        if self._stop is not None:
            self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
        self._thread = None

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Flush this host's total, stop this handle's flusher and release its
        connections and shared memory. Idempotent.

        A failed final flush does not raise: the adds stay in the host's shared memory
        for the next flush of any process of this host; :attr:`last_flush_error` keeps
        the error and a :class:`~safeshm.SafeShmWarning` says so.
        """
        if self._conn.closed:
            return
        self._stop_flusher()
        try:
            self._flush(periodic=False)
        except Exception as exc:  # noqa: BLE001 - closing must release everything
            self.last_flush_error = exc
            warnings.warn(
                SafeShmWarning(
                    f"{self._what}: the final flush failed ({exc}); this host's adds stay "
                    "in shared memory until another process of the host flushes them"
                ),
                stacklevel=2,
            )
        finally:
            self._release()

    def _release(self) -> None:
        self.__dict__.pop("add", None)
        _live_fleets.discard(self)
        self._gate.close()
        self._local.close()
        self._conn.close()

    def unlink(self) -> None:
        """Delete the fleet counter: its Redis keys and this host's shared-memory
        counters; this handle is closed (without a final flush). Works on a closed handle.

        Other hosts keep their shared-memory totals, and a running process there would
        publish them again at its next flush: stop the fleet's processes first, and
        remove the other hosts' local counters too (``safeshm rm fleet.NAME
        fleet.NAME.flush``), or a counter re-created under the name starts from them.
        """
        if not self._conn.closed:
            self._stop_flusher()
        _unlink_keys(self)
        local, gate = self._local.name, self._gate.name
        if not self._conn.closed:
            self._release()
        _unlink_local(ShardedCounter, local)
        _unlink_local(SafeCounter, gate)

    def __repr__(self) -> str:
        base = super().__repr__()
        return base[:-1] + f" host={self.__dict__.get('_field', '?')!r}>"


def _unlink_local(cls: type[ShardedCounter] | type[SafeCounter], name: str) -> None:
    """Unlink a local segment by name, if it is still there."""
    try:
        handle = cls.attach(name)
    except SegmentNotFoundError:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            handle.unlink()
    finally:
        handle.close()
