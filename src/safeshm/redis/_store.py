"""RedisStore[V]: ``SafeFileStore``'s mapping on a Redis hash, for processes on many hosts.

One Redis hash per store, ``safeshm:{NAME}:data``: a field per key, the serialized value
as the field's value (plain JSON by default, so ``redis-cli HGET`` shows it). The kind key
``safeshm:{NAME}`` records the serializer, so a handle opened with another one is refused
at ``open()`` instead of misreading values.

**Why compare-and-set by value, not WATCH/MULTI/EXEC and not a lock.** ``modify(key, fn)``
and ``transaction()`` run Python code between their read and their write, so neither can
be one Lua script. The choice is between three ways of making that read-compute-write
atomic:

* ``WATCH``/``MULTI``/``EXEC``: ``WATCH`` watches the whole hash, so two processes that
  modify *different* keys of one store conflict and retry each other; it needs a
  connection of its own for the duration (redis-py's ``pipeline()``), and under
  ``WAITAOF`` the write and its ``WAITAOF`` would not share a connection.
* A store-wide lease lock taken by ``modify``/``transaction``: correct only if plain
  writes honour the lock too (a ``store[k] = v`` between a transaction's read and its
  commit would otherwise be lost), which turns every write into a wait on a lease that a
  paused holder keeps until it expires. Slower, and a dead holder stalls the store.
* What is done here: **optimistic concurrency validated by value, in one Lua script at
  commit**. Reads are plain ``HGET`` commands (a transaction's later reads go through a
  script that also re-checks its earlier ones, see below); the commit script compares each
  key that was read with the value that was read (the bytes, or their SHA-1 for values over
  64 bytes; "absent" for a missing key) and writes only if all still match. Conflicts are
  per key, a plain write stays one ``HSET``, and every write is one command, to which a
  ``WAITAOF`` can be pipelined. The comparison is by value, so a key changed from A to B
  and back to A does not count as a conflict: that is still serializable, because the
  transaction's reads equal the state at the instant of its commit, and the commit happens
  at that instant.

``modify`` retries: on a conflict the script returns the current value and ``fn`` runs
again on it (so ``fn`` may run more than once; each conflict means another writer's
commit succeeded, so the store as a whole always makes progress). A ``with`` block cannot
be re-run, so :meth:`RedisStore.transaction` raises :class:`TransactionConflictError` on a
conflict, having written nothing; wrap the block in a loop to retry it (the docstring shows
how). Each read inside a transaction validates the reads before it in the same script, so
the block never sees an inconsistent mix of two states (opacity): a conflict is raised at
the first read that would show one.

Durability (``durable=True``): the server must have fsynced a write before the call
returns. With ``appendonly yes`` and ``appendfsync always`` (checked at ``open()`` with
``CONFIG GET``) Redis fsyncs its append-only file before it sends any reply. Otherwise,
on Redis 7.2 or later (not on a Cluster), each write is pipelined with ``WAITAOF 1 0 0``
on the same connection: **that path is untested** (the test machines have Redis 7.0).
Otherwise ``open()`` raises :class:`DurabilityError`: never a silent downgrade. What the
check cannot see: a ``CONFIG SET appendfsync everysec`` made after ``open()``; a failover
to a replica (replication is asynchronous: the replica may lack the last acknowledged
writes); under ``WAITAOF``, other clients may read a write before its fsync completes.

``pop()`` and ``popitem()`` take the value off in one script; a value that then does not
decode is put back (``HSETNX``: unless the key was set again meanwhile) before
:class:`~safeshm.StoreCorruptedError` is raised.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import random
import time
from collections.abc import Callable, ItemsView, Iterable, Iterator, MutableMapping, ValuesView
from contextlib import suppress
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar, overload

import redis.exceptions as rex

from safeshm._errors import (
    DurabilityError,
    IncompatibleKeyError,
    SafeShmError,
    SerializerMismatchError,
    StoreClosedError,
    StoreCorruptedError,
    TransactionConflictError,
)
from safeshm._protocols import Guarantees
from safeshm._store._format import _key_bytes
from safeshm._store._serializers import (
    BytesSerializer,
    JSONSerializer,
    PickleSerializer,
    Serializer,
    SerializerName,
    _resolve_serializer,
)

from ._core import Connection, RedisStructure, _redact

if TYPE_CHECKING:
    from _typeshed import SupportsKeysAndGetItem

__all__ = [
    "DurabilityError",
    "RedisStore",
    "RedisTransaction",
    "SerializerMismatchError",
    "TransactionConflictError",
]

V = TypeVar("V")
T = TypeVar("T")

REDIS_STORE_DURABLE: Final = Guarantees(
    backend="redis",
    scope="network",
    holder_death="n/a",
    outcome_unknown=True,
    survives="server-crash",
)
REDIS_STORE_NOT_DURABLE: Final = Guarantees(
    backend="redis",
    scope="network",
    holder_death="n/a",
    outcome_unknown=True,
    survives="server-memory",
)

# Redis refuses a bulk string over proto-max-bulk-len, 512 MiB by default: refused here,
# before anything is sent.
MAX_VALUE_BYTES: Final = 512 * 1024 * 1024
# A value read by modify()/transaction() is compared at commit as itself up to this size,
# as its SHA-1 above it (so a large value is not sent back to the server).
_INLINE_COMPARE: Final = 64
# The errors by which the built-in serializers say "these bytes are not a value of mine".
_UNDECODABLE: Final = (ValueError, EOFError, pickle.UnpicklingError)

_MISSING: Final[Any] = object()


# --- Lua ----------------------------------------------------------------------------------
# A read-set check, shared by the transaction scripts: from ARGV[i], N then N triples
# (field, mode, expected) -- mode 'n': absent, 'v': equal to expected, 'h': SHA-1 hex of the
# value equal to expected -- then K and K fields: the key set read (K = -1: none). Returns
# the index after them, or nil if any check fails.
_VALID: Final = """
local function valid(h, i)
    local n = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, n do
        local f, mode, want = ARGV[i], ARGV[i + 1], ARGV[i + 2]
        i = i + 3
        local have = redis.call('HGET', h, f)
        if mode == 'n' then
            if have then return nil end
        elseif not have then
            return nil
        elseif mode == 'v' then
            if have ~= want then return nil end
        elseif redis.sha1hex(have) ~= want then
            return nil
        end
    end
    local k = tonumber(ARGV[i])
    i = i + 1
    if k >= 0 then
        if redis.call('HLEN', h) ~= k then return nil end
        for j = i, i + k - 1 do
            if redis.call('HEXISTS', h, ARGV[j]) == 0 then return nil end
        end
        i = i + k
    end
    return i
end
"""

# KEYS[1] the hash. ARGV: a read-set check, then 'keys' (the key set) or 'get' and fields.
# {0} on a conflict, else {1, HKEYS} or {1, {value or false, ...}}.
_TX_READ: Final = (
    _VALID
    + """
local h = KEYS[1]
local i = valid(h, 1)
if not i then return {0} end
if ARGV[i] == 'keys' then return {1, redis.call('HKEYS', h)} end
local out = {}
for j = i + 1, #ARGV do out[#out + 1] = redis.call('HGET', h, ARGV[j]) or false end
return {1, out}
"""
)

# KEYS[1] the hash. ARGV: a read-set check, then W and W triples (op 's'|'d', field, value).
# 0 on a conflict (nothing written), else 1.
_TX_COMMIT: Final = (
    _VALID
    + """
local h = KEYS[1]
local i = valid(h, 1)
if not i then return 0 end
local w = tonumber(ARGV[i])
i = i + 1
for _ = 1, w do
    if ARGV[i] == 's' then
        redis.call('HSET', h, ARGV[i + 1], ARGV[i + 2])
    else
        redis.call('HDEL', h, ARGV[i + 1])
    end
    i = i + 3
end
return 1
"""
)

# modify(): KEYS[1] the hash; ARGV field, mode, expected (as in _VALID), new value.
# {1} if written, else {0, the current value or nil}: modify's next try needs no HGET.
_CAS: Final = """
local have = redis.call('HGET', KEYS[1], ARGV[1])
local ok
if ARGV[2] == 'n' then
    ok = not have
elseif not have then
    ok = false
elseif ARGV[2] == 'v' then
    ok = have == ARGV[3]
else
    ok = redis.sha1hex(have) == ARGV[3]
end
if ok then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
    return {1}
end
return {0, have}
"""

_POP: Final = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then redis.call('HDEL', KEYS[1], ARGV[1]) end
return v
"""

_POPITEM: Final = """
local f = redis.call('HRANDFIELD', KEYS[1])
if not f then return false end
local v = redis.call('HGET', KEYS[1], f)
redis.call('HDEL', KEYS[1], f)
return {f, v}
"""

_SETDEFAULT: Final = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then return {1} end
return {0, redis.call('HGET', KEYS[1], ARGV[1])}
"""


def _expect(data: bytes | None) -> tuple[str, bytes | str]:
    """How the commit script checks that a key still holds what was read (see _VALID)."""
    if data is None:
        return "n", b""
    if len(data) <= _INLINE_COMPARE:
        return "v", data
    return "h", hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _lookup_key(key: object) -> bytes | None:
    """The field for a key to look up; ``None`` for a str that no key can be (empty, not
    UTF-8): missing, as ``SafeFileStore`` has it. ``TypeError`` for a non-str."""
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, not {type(key).__name__}")
    if not key:
        return None
    try:
        return key.encode()
    except UnicodeEncodeError:
        return None


def _check_value_size(data: bytes) -> None:
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(
            f"a value of {len(data)} bytes is larger than a Redis store takes "
            f"({MAX_VALUE_BYTES} bytes, Redis's proto-max-bulk-len)"
        )


def _version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


_Mode = Literal["none", "always", "waitaof"]


class RedisStore(RedisStructure, MutableMapping[str, V]):
    """A key-value store in one Redis hash, shared by processes on any number of hosts.

    The same typed ``MutableMapping[str, V]`` as :class:`~safeshm.SafeFileStore`, and the
    same serializers (``"json"`` by default, ``"bytes"``, opt-in ``"pickle"``, or a
    :class:`~safeshm.Serializer` object); both satisfy :class:`~safeshm.SharedStore`.

    Guarantees:

    * Every single-key operation is one Redis command or script: atomic. ``update()``
      is one ``HSET`` of every key (all or none); ``pop``, ``popitem`` and
      ``setdefault`` are one script each; ``clear()`` deletes the hash.
    * :meth:`modify` is an atomic read-modify-write: optimistic, validated at commit by
      a script that writes only if the key still holds what ``fn`` was given, else runs
      ``fn`` again on the new value. ``fn`` may therefore run more than once: keep it
      free of side effects, and do not change its argument in place.
    * :meth:`transaction` is all-or-nothing and serializable, validated the same way at
      commit; on a conflict it raises :class:`TransactionConflictError` and writes nothing
      (it cannot re-run a ``with`` block for you).
    * ``durable=True`` (the default): a write returns only after the server fsynced it
      (``appendfsync always``, checked at open; ``WAITAOF`` on Redis 7.2+), so it survives
      a crash of the server (``kill -9``, power loss of its machine); otherwise open
      raises :class:`DurabilityError`. ``durable=False`` works on any server: a server
      crash may lose the last writes that it acknowledged.
    * A dropped connection: reads and absolute writes (``store[k] = v``, ``del``,
      ``update``, ``clear``, ``setdefault``) are retried once on a new connection;
      ``modify``, a transaction's commit, ``pop`` and ``popitem`` are never retried and
      raise :class:`~safeshm.OutcomeUnknownError` (applied once or not at all).

    Differences from ``SafeFileStore``: ``fn`` of ``modify`` may run more than once; a
    transaction can fail with a conflict instead of waiting for a lock (and transactions
    may nest: each commits on its own); a value that is not what the serializer wrote (a
    foreign client wrote the hash) raises :class:`~safeshm.StoreCorruptedError` when
    read, but a ``"bytes"`` store cannot tell. The ``timeout=`` options of
    ``SafeFileStore`` (waiting for its write lock) have no counterpart.

    Args:
        url: ``redis://HOST:PORT/DB#NAME`` (see :mod:`safeshm.redis`).
        serializer: ``"json"``, ``"bytes"``, ``"pickle"`` or a :class:`Serializer`;
            recorded by the first opener, and the same one is required of the others.
        durable: require the server to fsync each write before the call returns.

    Raises:
        DurabilityError: ``durable=True`` and the server cannot promise it.
        SerializerMismatchError: the store was created with another serializer (an
            :class:`~safeshm.IncompatibleStoreError`).
        IncompatibleKeyError: the name holds another kind of structure, or a key that
            safeshm did not write.
        BackendUnavailableError: the server cannot be reached.

    Example:
        >>> with RedisStore.open("redis://localhost:6379/0#jobs") as store:  # doctest: +SKIP
        ...     store["job:42"] = {"batch": 17}
        ...     store.modify("processed", lambda n: n + 1, default=0)
        ...     with store.transaction() as tx:
        ...         tx["job:42"] = {"batch": 18}
        ...         tx["processed"] = tx["processed"] + 1
    """

    _kind_tag = "store"

    @overload
    def __init__(
        self: RedisStore[Any],
        url: str,
        *,
        serializer: Literal["json"] = ...,
        durable: bool = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: RedisStore[bytes],
        url: str,
        *,
        serializer: Literal["bytes"],
        durable: bool = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: RedisStore[Any],
        url: str,
        *,
        serializer: Literal["pickle"],
        durable: bool = ...,
    ) -> None: ...

    @overload
    def __init__(self, url: str, *, serializer: Serializer[V], durable: bool = ...) -> None: ...

    def __init__(
        self,
        url: str,
        *,
        serializer: SerializerName | Serializer[Any] = "json",
        durable: bool = True,
    ) -> None:
        # Everything is checked before anything is sent.
        if not isinstance(durable, bool):
            raise TypeError(f"durable must be a bool, not {type(durable).__name__}")
        self._serializer: Serializer[V] = _resolve_serializer(serializer)
        self._durable = durable
        # Not RedisStructure.__init__: durability is checked before the name is claimed,
        # so a refused open leaves nothing behind.
        self._conn = Connection(type(self).__name__, url)
        self._data = self._conn.key("data")
        try:
            self._mode: _Mode = self._check_durability() if durable else "none"
            self._claim()
        except BaseException:
            self._conn.close()
            raise

    @overload
    @classmethod
    def open(
        cls, url: str, *, serializer: Literal["json"] = ..., durable: bool = ...
    ) -> RedisStore[Any]: ...

    @overload
    @classmethod
    def open(
        cls, url: str, *, serializer: Literal["bytes"], durable: bool = ...
    ) -> RedisStore[bytes]: ...

    @overload
    @classmethod
    def open(
        cls, url: str, *, serializer: Literal["pickle"], durable: bool = ...
    ) -> RedisStore[Any]: ...

    @overload
    @classmethod
    def open(cls, url: str, *, serializer: Serializer[T], durable: bool = ...) -> RedisStore[T]: ...

    @classmethod
    def open(
        cls,
        url: str,
        *,
        serializer: SerializerName | Serializer[Any] = "json",
        durable: bool = True,
    ) -> RedisStore[Any]:
        """Open the store named by ``url``'s fragment, creating it on first use (the
        same as the constructor)."""
        return cls(url, serializer=serializer, durable=durable)

    # --- opening ------------------------------------------------------------------------------
    def _claim(self) -> None:
        name = self._serializer.name
        try:
            self._conn.claim_kind(self._kind_tag, {"serializer": name})
        except IncompatibleKeyError as exc:
            kind_key = self._conn.kind_key
            try:
                recorded = self._conn.call(lambda c: c.hgetall(kind_key), idempotent=True)
            except IncompatibleKeyError:
                raise exc from None  # not a hash: claim_kind's message says what it is
            kind = recorded.get(b"kind")
            found = recorded.get(b"serializer")
            if kind == self._kind_tag.encode() and found is not None and found != name.encode():
                raise SerializerMismatchError(
                    f"the RedisStore {self.name!r} was written with serializer "
                    f"{found.decode(errors='replace')!r}, but was opened with serializer "
                    f"{name!r}"
                ) from exc
            raise

    def _check_durability(self) -> _Mode:
        """How writes are made durable here, or :class:`DurabilityError`."""
        conn = self._conn
        data = self._data

        def node_kwargs(c: Any) -> dict[str, Any]:
            # On a Cluster, ask the node that holds the store's slot.
            return {"target_nodes": c.get_node_from_key(data)} if conn.cluster else {}

        def config(c: Any) -> dict[str, str] | str:
            try:
                found = c.config_get("append*", **node_kwargs(c))
            except rex.ResponseError as exc:  # CONFIG renamed, disabled or not permitted
                return str(exc)
            return {_text(k): _text(v) for k, v in found.items()}

        def version(c: Any) -> str:
            info = c.info("server", **node_kwargs(c))
            return _text(info.get("redis_version", "0"))

        found = conn.call(config, idempotent=True)
        if isinstance(found, dict):
            if found.get("appendonly") == "yes" and found.get("appendfsync") == "always":
                return "always"
            setting = (
                f"appendonly={found.get('appendonly')!r}, appendfsync={found.get('appendfsync')!r}"
            )
        else:
            setting = f"CONFIG GET is not available to check it ({found})"
        server = conn.call(version, idempotent=True)
        if _version(server) >= (7, 2) and not conn.cluster:
            # WAITAOF refuses at once when the AOF is off; with it on, a client that wrote
            # nothing yet is acknowledged at once.
            def probe(c: Any) -> list[int] | str:
                try:
                    return list(c.execute_command("WAITAOF", 1, 0, 0))
                except rex.ResponseError as exc:
                    return str(exc)

            answer = conn.call(probe, idempotent=True)
            if isinstance(answer, list):
                return "waitaof"
            setting += f"; WAITAOF refused: {answer}"
        raise DurabilityError(
            f"cannot open {conn.what} with durable=True: the server (Redis {server}) does "
            f"not fsync a write before it replies ({setting}). Configure it with "
            "'appendonly yes' and 'appendfsync always' (or use Redis >= 7.2 with "
            "appendonly yes, where each write waits for WAITAOF; on a Cluster, "
            "appendfsync always is required), or open the store with durable=False to "
            "accept that a crash of the server may lose its last acknowledged writes"
        )

    # --- sending ------------------------------------------------------------------------------
    def _write(self, op: Callable[[Any], Any], *, idempotent: bool) -> Any:
        """Run the write ``op(target)`` (target: the client, or a pipeline under
        ``WAITAOF``), durable as this handle promises."""
        if self._mode != "waitaof":
            return self._conn.call(op, idempotent=idempotent)
        what = self._conn.what

        def run(c: Any) -> Any:
            # WAITAOF waits for this connection's own writes: the write and its WAITAOF
            # go down one connection, as one pipeline. (Untested: Redis 7.2+ only.)
            pipe = c.pipeline(transaction=False)
            op(pipe)
            pipe.execute_command("WAITAOF", 1, 0, 0)
            result, ack = pipe.execute(raise_on_error=False)
            if isinstance(result, Exception):
                raise result
            if isinstance(ack, Exception) or not ack or int(ack[0]) < 1:
                raise DurabilityError(
                    f"a write to {what} was applied, but the server did not confirm that "
                    f"it fsynced it ({ack!r})"
                )
            return result

        return self._conn.call(run, idempotent=idempotent)

    def _run(self, script: Any, data: str, args: list[Any], *, idempotent: bool) -> Any:
        """Run a writing script on the store's hash."""
        return self._write(
            lambda c: script(keys=[data], args=args, client=c), idempotent=idempotent
        )

    def _read(self, op: Callable[[Any], T]) -> T:
        return self._conn.call(op, idempotent=True)

    def _script(self, source: str) -> Any:
        return self._conn.script(source)

    # --- values -------------------------------------------------------------------------------
    def _dumps(self, value: V) -> bytes:
        data = self._serializer.dumps(value)
        if not isinstance(data, bytes):
            raise TypeError(
                f"serializer {self._serializer.name!r} returned {type(data).__name__}, not bytes"
            )
        _check_value_size(data)
        return data

    def _loads(self, key: str, data: bytes) -> V:
        try:
            return self._serializer.loads(data)
        except _UNDECODABLE as exc:
            raise StoreCorruptedError(
                f"{self._conn.what}: the value of key {key!r} cannot be decoded by serializer "
                f"{self._serializer.name!r} ({type(exc).__name__}: {exc}); it was not written "
                "by a RedisStore with this serializer"
            ) from exc

    def _key(self, field: bytes) -> str:
        try:
            return field.decode()
        except UnicodeDecodeError:
            raise StoreCorruptedError(
                f"{self._conn.what}: the hash holds a field that is not UTF-8 "
                f"({field[:40]!r}); it was not written by a RedisStore"
            ) from None

    def _snapshot(self) -> list[tuple[str, bytes]]:
        data = self._data
        found: dict[bytes, bytes] = self._read(lambda c: c.hgetall(data))
        return [(self._key(k), v) for k, v in found.items()]

    # --- the mapping --------------------------------------------------------------------------
    def __getitem__(self, key: str) -> V:
        kb = _lookup_key(key)
        if kb is None:
            raise KeyError(key)
        data = self._data
        found: bytes | None = self._read(lambda c: c.hget(data, kb))
        if found is None:
            raise KeyError(key)
        return self._loads(key, found)

    def __setitem__(self, key: str, value: V) -> None:
        """Set ``key`` (one ``HSET``; an absolute value, so a dropped connection is
        retried once)."""
        kb = _key_bytes(key)
        encoded = self._dumps(value)
        data = self._data
        self._write(lambda c: c.hset(data, kb, encoded), idempotent=True)

    def __delitem__(self, key: str) -> None:
        """Delete ``key``: ``KeyError`` if it is missing. A dropped connection is retried
        once; if the retry finds the key gone, the first try may have deleted it, so no
        ``KeyError`` is raised then (the key is gone either way)."""
        kb = _key_bytes(key)
        data = self._data
        tries = 0

        def op(c: Any) -> Any:
            nonlocal tries
            tries += 1
            return c.hdel(data, kb)

        if not self._write(op, idempotent=True) and tries == 1:
            raise KeyError(key)

    @overload
    def get(self, key: str, /) -> V | None: ...

    @overload
    def get(self, key: str, default: V | T, /) -> V | T: ...

    def get(self, key: str, default: Any = None, /) -> Any:
        """The value of ``key``, or ``default`` if it is missing (one ``HGET``)."""
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        kb = _lookup_key(key)
        if kb is None:
            return False
        data = self._data
        return bool(self._read(lambda c: c.hexists(data, kb)))

    def __iter__(self) -> Iterator[str]:
        """Iterate over a snapshot of the keys (one ``HKEYS``)."""
        data = self._data
        fields: list[bytes] = self._read(lambda c: c.hkeys(data))
        return iter([self._key(f) for f in fields])

    def __len__(self) -> int:
        data = self._data
        return int(self._read(lambda c: c.hlen(data)))

    def items(self) -> ItemsView[str, V]:
        """The items, as one consistent snapshot (one ``HGETALL``)."""
        return _ItemsSnapshot(self)

    def values(self) -> ValuesView[V]:
        """The values, as one consistent snapshot (one ``HGETALL``)."""
        return _ValuesSnapshot(self)

    def to_dict(self) -> dict[str, V]:
        """All keys and values, as one consistent snapshot (one ``HGETALL``)."""
        return {key: self._loads(key, data) for key, data in self._snapshot()}

    # --- atomic compound operations -------------------------------------------------------
    @overload
    def pop(self, key: str, /) -> V: ...

    @overload
    def pop(self, key: str, default: V, /) -> V: ...

    @overload
    def pop(self, key: str, default: T, /) -> V | T: ...

    def pop(self, key: str, default: Any = _MISSING, /) -> Any:
        """Remove ``key`` and return its value (or ``default``), atomically (one script;
        not retried: a dropped connection raises ``OutcomeUnknownError``)."""
        kb = _lookup_key(key)
        script = self._script(_POP)
        found = None if kb is None else self._run(script, self._data, [kb], idempotent=False)
        if found is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return self._loads_popped(key, found)

    def _loads_popped(self, key: str, data: bytes) -> V:
        """Decode a value that pop()/popitem() took off; one that does not decode is put
        back (unless the key was set again meanwhile) before the error is raised."""
        try:
            return self._loads(key, data)
        except StoreCorruptedError:
            self._put_back(key.encode(), data)
            raise

    def _put_back(self, field: bytes, data: bytes) -> None:
        h = self._data
        with suppress(SafeShmError):
            self._write(lambda c: c.hsetnx(h, field, data), idempotent=True)

    def popitem(self) -> tuple[str, V]:
        """Remove and return some ``(key, value)`` pair (a random one), atomically.
        ``KeyError`` if the store is empty."""
        data = self._data
        script = self._script(_POPITEM)
        found = self._write(lambda c: script(keys=[data], args=[], client=c), idempotent=False)
        if not found:
            raise KeyError("popitem(): the store is empty")
        try:
            key = self._key(found[0])
        except StoreCorruptedError:
            self._put_back(found[0], found[1])
            raise
        return key, self._loads_popped(key, found[1])

    @overload
    def setdefault(self, key: str, default: V, /) -> V: ...

    @overload
    def setdefault(self: RedisStore[T | None], key: str, default: None = None, /) -> T | None: ...

    def setdefault(self, key: str, default: Any = None, /) -> Any:
        """Return the value of ``key``, first storing ``default`` if it is missing,
        atomically (one script)."""
        kb = _key_bytes(key)
        encoded = self._dumps(default)
        data = self._data
        script = self._script(_SETDEFAULT)
        found = self._write(
            lambda c: script(keys=[data], args=[kb, encoded], client=c), idempotent=True
        )
        if int(found[0]) == 1:
            return default
        return self._loads(key, found[1])

    def clear(self) -> None:
        """Delete every key, atomically (the hash is deleted)."""
        data = self._data
        self._write(lambda c: c.delete(data), idempotent=True)

    def update(
        self, other: SupportsKeysAndGetItem[str, V] | Iterable[tuple[str, V]] = (), /, **kwargs: V
    ) -> None:
        """Set several keys in one ``HSET``: all of them or, on any error (an unencodable
        value, a bad key), none, and nothing is sent."""
        pairs: dict[bytes, bytes] = {}
        items: Iterable[tuple[str, V]]
        if hasattr(other, "keys"):
            mapping: Any = other
            items = [(k, mapping[k]) for k in mapping]
        else:
            items = other
        for key, value in (*items, *kwargs.items()):
            kb = _key_bytes(key)
            pairs.pop(kb, None)
            pairs[kb] = self._dumps(value)
        if not pairs:
            return
        data = self._data
        self._write(lambda c: c.hset(data, mapping=pairs), idempotent=True)

    @overload
    def modify(self, key: str, fn: Callable[[V], V]) -> V: ...

    @overload
    def modify(self, key: str, fn: Callable[[V], V], default: V) -> V: ...

    def modify(self, key: str, fn: Callable[[V], V], default: V = _MISSING) -> V:
        """Atomically replace the value of ``key`` with ``fn(value)`` and return the new
        value.

        Optimistic: the value is read, ``fn`` runs here, and a script writes the result
        only if the key still holds the value ``fn`` was given; otherwise ``fn`` runs
        again on the value found. No update is lost:
        ``store.modify("hits", lambda n: n + 1, default=0)`` counts exactly under any
        number of processes. ``fn`` may run more than once: keep it free of side effects
        and do not change its argument in place.

        Args:
            key: the key.
            fn: computes the new value from the current one.
            default: used as the current value when ``key`` is missing.

        Raises:
            KeyError: ``key`` is missing and no ``default`` was given.
            OutcomeUnknownError: the connection dropped after the write was sent: it was
                applied once or not at all (never retried).
            Exception: whatever ``fn`` or the serializer raises; nothing is written.
        """
        kb = _key_bytes(key)
        data = self._data
        found: bytes | None = self._read(lambda c: c.hget(data, kb))
        script = self._script(_CAS)
        pristine: Any = _MISSING
        conflicts = 0
        while True:
            if found is not None:
                current = self._loads(key, found)
            elif default is _MISSING:
                raise KeyError(key)
            elif pristine is _MISSING:
                # fn may change the default in place; a retry gets a fresh copy.
                with suppress(Exception):
                    pristine = copy.deepcopy(default)
                current = default
            else:
                current = copy.deepcopy(pristine)
            new = fn(current)
            encoded = self._dumps(new)
            reply = self._run(script, data, [kb, *_expect(found), encoded], idempotent=False)
            if int(reply[0]) == 1:
                return new
            found = reply[1] if len(reply) > 1 else None
            conflicts += 1
            _back_off(conflicts)

    def transaction(self) -> RedisTransaction[V]:
        """A multi-key, all-or-nothing, serializable transaction, checked at commit.

        ``with store.transaction() as tx:`` gives a ``MutableMapping`` that reads the
        store (and the block's own writes) and buffers the writes; on a normal exit one
        script checks that every key the block read still holds what it read and applies
        all the writes, or none; on an exception in the block nothing is written. Reads
        in the block see one consistent state (each read re-checks the earlier ones).

        A conflict -- another writer changed a key the block read -- raises
        :class:`TransactionConflictError` (from a read, or from the commit at the end of
        the block), with nothing written. Retry the block::

            while True:
                try:
                    with store.transaction() as tx:
                        tx["b"] = tx["b"] + tx.pop("a")
                    break
                except TransactionConflictError:
                    continue

        Raises:
            TransactionConflictError: see above; nothing was written.
            OutcomeUnknownError: the connection dropped after the commit was sent: it was
                applied whole or not at all (never retried).
        """
        self._conn.check_open()
        return RedisTransaction(self)

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def durable(self) -> bool:
        return self._durable

    @property
    def serializer(self) -> Serializer[V]:
        return self._serializer

    @property
    def guarantees(self) -> Guarantees:
        """What this store promises (``safeshm.Guarantees``): on a Redis server, reachable
        from any host; with ``durable=True`` an acknowledged write survives a crash of the
        server (``"server-crash"``), else only as long as the server runs
        (``"server-memory"``); a dropped connection can leave a ``modify``/transaction's
        outcome unknown."""
        return REDIS_STORE_DURABLE if self._durable else REDIS_STORE_NOT_DURABLE

    def _reopen_args(self) -> tuple[Any, ...]:
        serializer: object = self._serializer
        if type(serializer) in (JSONSerializer, BytesSerializer, PickleSerializer):
            serializer = self._serializer.name
        return (self.url, serializer, self._durable)

    @classmethod
    def _reopen(cls, *args: Any) -> Self:
        url, serializer, durable = args
        return cls(url, serializer=serializer, durable=durable)

    def __enter__(self) -> Self:
        self._conn.check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            state = ", closed=True" if self.closed else ""
            return (
                f"safeshm.redis.RedisStore({_redact(self.url)!r}, "
                f"serializer={self._serializer.name!r}, durable={self._durable}{state})"
            )
        except Exception:  # noqa: BLE001 - repr must never raise
            return "<safeshm.redis.RedisStore (uninitialised)>"


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _back_off(conflicts: int) -> None:
    """After repeated conflicts on one key, wait a little (random, up to 5 ms): every
    conflict means another writer committed, so waiting spreads the contenders out."""
    if conflicts >= 3:
        time.sleep(random.uniform(0, min(0.005, 0.0001 * 2**conflicts)))


class _ItemsSnapshot(ItemsView[str, V]):
    def __init__(self, store: RedisStore[V]) -> None:
        super().__init__(store)
        self._store = store

    def __iter__(self) -> Iterator[tuple[str, V]]:
        store = self._store
        return iter([(key, store._loads(key, data)) for key, data in store._snapshot()])


class _ValuesSnapshot(ValuesView[V]):
    def __init__(self, store: RedisStore[V]) -> None:
        super().__init__(store)
        self._store = store

    def __iter__(self) -> Iterator[V]:
        store = self._store
        return iter([store._loads(key, data) for key, data in store._snapshot()])


class RedisTransaction(MutableMapping[str, V]):
    """The view of a store inside ``with store.transaction() as tx:`` (see
    :meth:`RedisStore.transaction`). Values written to it are encoded at once (an
    unencodable value raises there, in the block) and committed together on exit."""

    def __init__(self, store: RedisStore[V]) -> None:
        self._store = store
        self._state = "new"
        self._reads: dict[str, bytes | None] = {}  # what the block read, raw
        self._keyset: list[str] | None = None  # the key set, if the block listed it
        self._ops: dict[str, bytes | None] = {}  # key -> new value, None: deleted

    def __enter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a transaction can be entered only once")
        self._store._conn.check_open()
        self._state = "open"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state, self._state = self._state, "done"
        if state == "failed" and exc_type is None:
            # The block caught the conflict and went on: its writes are not committed,
            # which must not pass in silence.
            raise self._conflict()
        if exc_type is not None or state != "open" or not self._ops:
            return  # an exception (or nothing written): nothing to commit
        store = self._store
        args = self._checks()
        args.append(len(self._ops))
        for key, value in self._ops.items():
            if value is None:
                args += ["d", key.encode(), b""]
            else:
                args += ["s", key.encode(), value]
        data = store._data
        script = store._script(_TX_COMMIT)
        done = store._write(lambda c: script(keys=[data], args=args, client=c), idempotent=False)
        if int(done) != 1:
            raise TransactionConflictError(
                f"transaction on {store._conn.what}: a key it read was changed by another "
                "writer before it committed; nothing was written (run it again)"
            )

    def _checks(self) -> list[Any]:
        """The read-set check (see ``_VALID``) of everything read so far."""
        args: list[Any] = [len(self._reads)]
        for key, data in self._reads.items():
            mode, expected = _expect(data)
            args += [key.encode(), mode, expected]
        if self._keyset is None:
            args.append(-1)
        else:
            args.append(len(self._keyset))
            args += [k.encode() for k in self._keyset]
        return args

    def _conflict(self) -> TransactionConflictError:
        if self._state == "open":
            self._state = "failed"  # the block goes on only to see this error
        return TransactionConflictError(
            f"transaction on {self._store._conn.what}: a key it read was changed by another "
            "writer meanwhile; nothing was written (run it again)"
        )

    def _check(self) -> None:
        if self._state != "open":
            raise StoreClosedError(
                "this transaction is not open: use it inside its "
                "`with store.transaction() as tx:` block"
                + (" (it failed with a conflict)" if self._state == "failed" else "")
            )

    def _fetch(self, key: str) -> bytes | None:
        """The committed value of ``key`` as of the transaction's snapshot."""
        if key in self._reads:
            return self._reads[key]
        store = self._store
        data = store._data
        kb = key.encode()
        value: bytes | None
        if not self._reads and self._keyset is None:
            # The first read has nothing to be consistent with: a plain HGET.
            value = store._read(lambda c: c.hget(data, kb))
        else:
            args = self._checks()
            args += ["get", kb]
            script = store._script(_TX_READ)
            reply = store._read(lambda c: script(keys=[data], args=args, client=c))
            if int(reply[0]) != 1:
                raise self._conflict()
            value = reply[1][0]
        self._reads[key] = value
        return value

    def _lookup(self, key: str) -> bytes | None:
        self._check()
        if key in self._ops:
            return self._ops[key]
        return self._fetch(key)

    def __getitem__(self, key: str) -> V:
        if _lookup_key(key) is None:
            self._check()
            raise KeyError(key)
        data = self._lookup(key)
        if data is None:
            raise KeyError(key)
        return self._store._loads(key, data)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or _lookup_key(key) is None:
            return False
        return self._lookup(key) is not None

    def __setitem__(self, key: str, value: V) -> None:
        self._check()
        _key_bytes(key)
        encoded = self._store._dumps(value)
        self._ops.pop(key, None)  # re-inserted last: operations commit in the order made
        self._ops[key] = encoded

    def __delitem__(self, key: str) -> None:
        _key_bytes(key)
        if self._lookup(key) is None:
            raise KeyError(key)
        self._ops.pop(key, None)
        self._ops[key] = None

    def _keys(self) -> list[str]:
        self._check()
        if self._keyset is None:
            store = self._store
            data = store._data
            fields: list[bytes]
            if not self._reads:
                fields = store._read(lambda c: c.hkeys(data))
            else:
                args = self._checks()
                args.append("keys")
                script = store._script(_TX_READ)
                reply = store._read(lambda c: script(keys=[data], args=args, client=c))
                if int(reply[0]) != 1:
                    raise self._conflict()
                fields = reply[1]
            self._keyset = [store._key(f) for f in fields]
        keys = dict.fromkeys(self._keyset)
        for key, value in self._ops.items():
            if value is None:
                keys.pop(key, None)
            else:
                keys[key] = None
        return list(keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        return f"<safeshm.redis.RedisTransaction on {self._store!r}, {self._state}>"
