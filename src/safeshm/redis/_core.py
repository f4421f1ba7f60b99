"""What every Redis-backed structure shares: the connection, key names, error translation.

One :class:`Connection` per structure handle wraps a redis-py client made with **no
automatic retries** (redis-py 6+ retries a command whose connection dropped, by default:
an ``INCRBY`` or ``RPUSH`` could then be applied twice). Every command goes through
:meth:`Connection.call`, which says what a failure means:

* the server could not be reached or was still loading (nothing was sent, or the server
  refused before executing): :class:`~safeshm.BackendUnavailableError`. Reads and
  idempotent writes are tried once more on a fresh connection first;
* the connection dropped after a non-idempotent write was sent:
  :class:`~safeshm.OutcomeUnknownError`, never a retry;
* a key of another type under the name: :class:`~safeshm.IncompatibleKeyError`;
* bad credentials: :class:`~safeshm.BackendAuthenticationError`.

No raw redis-py exception reaches the caller.

Keys: every key of the structure ``NAME`` is ``safeshm:{NAME}:<part>``. The braces are
Redis Cluster's hash tag, so all of a structure's keys live in one slot and its scripts
run on one node. Names follow the shared-memory rules (letters, digits, ``_ - .``), so
they never contain a brace.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, Literal, Self, TypeVar

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from safeshm._errors import (
    BackendAuthenticationError,
    BackendUnavailableError,
    HandleClosedError,
    IncompatibleKeyError,
    OutcomeUnknownError,
    SafeShmError,
)
from safeshm._segment import validate_name

__all__ = ["Connection", "RedisStructure", "parse_url"]

R = TypeVar("R")

KEY_PREFIX: Final = "safeshm:"
# How long a call keeps retrying while the server answers LOADING (it restarted and is
# reading its append-only file): nothing was executed, so waiting is safe.
_LOADING_WAIT: Final = 10.0

# Query parameters of a safeshm URL that are ours; every other one goes to redis-py's
# from_url (socket_timeout, socket_connect_timeout, health_check_interval, ...).
_OUR_PARAMS: Final = frozenset({"cluster"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class ClosedHandleError(HandleClosedError):
    """A Redis-backed handle was used after ``close()``."""


def parse_url(url: str) -> tuple[str, str, bool]:
    """Split ``redis://host:port/db?opts#NAME`` into (the URL for redis-py, NAME, cluster).

    ``rediss://`` (TLS) and ``unix:///path/to/socket?db=N`` work as in redis-py. The
    fragment is the structure's name. ``?cluster=1`` connects to a Redis Cluster.
    """
    if not isinstance(url, str):
        raise TypeError(f"a URL is a str, not {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"not a Redis URL: {url!r} (expected redis://HOST:PORT/DB#NAME, "
            "rediss://... or unix:///PATH#NAME)"
        )
    if not parts.fragment:
        raise ValueError(
            f"the Redis URL {_redact(url)!r} names no structure: add '#NAME' "
            "(for example redis://localhost:6379/0#jobs)"
        )
    name = validate_name(urllib.parse.unquote(parts.fragment))
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    cluster = False
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key == "cluster":
            if value.lower() in _TRUE:
                cluster = True
            elif value.lower() not in _FALSE:
                raise ValueError(f"cluster={value!r} in a Redis URL: use cluster=1 or cluster=0")
        elif key == "decode_responses":
            raise ValueError(
                "decode_responses in a safeshm Redis URL: safeshm reads bytes and decodes "
                "them itself (drop the option)"
            )
        else:
            rest.append((key, value))
    plain = urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urllib.parse.urlencode(rest), "")
    )
    return plain, name, cluster


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def make_client(url: str, cluster: bool) -> Any:
    """A redis-py client for ``url`` with automatic retries off."""
    options: dict[str, Any] = {
        "retry": _no_retry(),
        "retry_on_timeout": False,
        "socket_timeout": 10.0,
        "socket_connect_timeout": 5.0,
    }
    try:
        if cluster:
            return redis.RedisCluster.from_url(url, **options)
        return redis.Redis.from_url(url, **options)
    except (rex.RedisError, rex.RedisClusterException) as exc:
        raise BackendUnavailableError(f"cannot connect to Redis at {_redact(url)}: {exc}") from exc
    except ValueError as exc:  # redis-py's own URL parsing: a bad port, db, option
        raise ValueError(f"bad Redis URL {_redact(url)!r}: {exc}") from exc


def _connect_phase(exc: BaseException) -> bool:
    """Whether a redis-py connection error happened while connecting (nothing was sent).

    redis-py raises ``ConnectionError("Error N connecting to host:port. ...")`` and
    ``TimeoutError("Timeout connecting to server")`` from ``Connection.connect()``;
    after that, every failure is of a command already (maybe) sent.
    """
    if isinstance(exc, rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError):
        return True  # the handshake: no command was sent
    text = str(exc)
    return (
        "connecting to" in text
        or "Connection refused" in text
        or "HELLO must be called" in text
        or "NOAUTH" in text
    )


def _translate(exc: rex.RedisError, *, sent: bool, what: str) -> SafeShmError:  # noqa: PLR0911 - one case per kind
    """The typed error for a redis-py exception."""
    if isinstance(exc, rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError):
        return BackendAuthenticationError(f"Redis at {what} refused the credentials: {exc}")
    if isinstance(exc, rex.NoPermissionError):
        return BackendAuthenticationError(f"Redis at {what}: no permission: {exc}")
    if isinstance(exc, rex.BusyLoadingError):
        return BackendUnavailableError(f"Redis at {what} is loading its data: {exc}")
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        if sent and not _connect_phase(exc):
            return OutcomeUnknownError(
                f"the connection to Redis at {what} failed after the write was sent "
                f"({exc}): it may or may not have been applied"
            )
        return BackendUnavailableError(f"cannot reach Redis at {what}: {exc}")
    if isinstance(exc, rex.ResponseError) and str(exc).startswith("WRONGTYPE"):
        return IncompatibleKeyError(
            f"a key of the Redis structure {what} holds another type of data: {exc}"
        )
    if isinstance(exc, rex.ResponseError) and "NOAUTH" in str(exc):
        return BackendAuthenticationError(f"Redis at {what} requires a password: {exc}")
    return BackendUnavailableError(f"Redis at {what} failed the command: {exc!r}")


class Connection:
    """A client, the structure's name and the typed-error rules; one per handle."""

    def __init__(self, kind: str, url: str) -> None:
        plain, name, cluster = parse_url(url)
        self.kind = kind
        self.name = name
        self.url: str = url
        self.client: Any = make_client(plain, cluster)
        self.cluster = cluster
        self.closed = False
        self._scripts: dict[str, Any] = {}
        self.what = f"{kind} {name!r} at {_redact(plain)}"

    def key(self, part: str) -> str:
        """The key ``safeshm:{NAME}:part``."""
        return f"{KEY_PREFIX}{{{self.name}}}:{part}"

    @property
    def kind_key(self) -> str:
        return f"{KEY_PREFIX}{{{self.name}}}"

    def script(self, source: str) -> Callable[..., Any]:
        """The callable for a Lua script (cached per source)."""
        found = self._scripts.get(source)
        if found is None:
            found = self.client.register_script(source)
            self._scripts[source] = found
        return found  # type: ignore[no-any-return]

    def check_open(self) -> None:
        if self.closed:
            raise ClosedHandleError(f"the handle of {self.what} is closed")

    def call(
        self,
        fn: Callable[[Any], R],
        *,
        idempotent: bool,
        deadline: float | None = None,
    ) -> R:
        """Run ``fn(client)``, translating every failure into a typed error.

        ``idempotent``: applying it twice is the same as once (reads, SET of an absolute
        value, a compare-and-delete): a dropped connection is retried once on a fresh
        one; if that fails too, ``OutcomeUnknownError`` (the first try may have run).
        Otherwise a dropped connection after sending is ``OutcomeUnknownError``.
        ``BackendUnavailableError`` always means that nothing was applied. Closing the
        handle from another thread during a call ends it with ``HandleClosedError``.
        The server's LOADING reply (nothing executed) is waited out, up to ``deadline``
        (monotonic) or 10 s.
        """
        self.check_open()
        tries = 2 if idempotent else 1
        maybe_applied = False  # a try failed after sending: it may have run
        loading_until = time.monotonic() + _LOADING_WAIT if deadline is None else deadline
        while True:
            try:
                return fn(self.client)
            except rex.BusyLoadingError as exc:
                if time.monotonic() >= loading_until:
                    raise self._error(exc, maybe_applied) from None
                time.sleep(0.05)
            except (rex.ConnectionError, rex.TimeoutError) as exc:
                tries -= 1
                connecting = _connect_phase(exc)
                if tries <= 0 or connecting:
                    raise self._error(exc, maybe_applied or not connecting) from None
                maybe_applied = True
            except rex.RedisError as exc:
                raise self._error(exc, maybe_applied) from None
            except rex.RedisClusterException as exc:  # not a RedisError: no slot, no node
                raise BackendUnavailableError(
                    f"Redis Cluster for {self.what} is not usable: {exc}"
                ) from None
            except (ValueError, AttributeError, OSError):
                # close() from another thread tore the connection down under this call.
                if self.closed:
                    raise ClosedHandleError(
                        f"the handle of {self.what} was closed during the call "
                        f"({'it may have been applied' if not idempotent else 'not retried'})"
                    ) from None
                raise

    def _error(self, exc: rex.RedisError, maybe_applied: bool) -> SafeShmError:
        if _connect_phase(exc) and "HELLO" in str(exc):
            return BackendAuthenticationError(
                f"Redis at {self.what} requires a password (or refused it): {exc}"
            )
        if maybe_applied and isinstance(exc, rex.ConnectionError | rex.TimeoutError):
            return OutcomeUnknownError(
                f"the connection to Redis at {self.what} failed after the command was "
                f"sent ({exc}): it may or may not have been applied"
            )
        if maybe_applied:
            # A retried idempotent command failed otherwise (LOADING, an error reply): its
            # first try may have run.
            return OutcomeUnknownError(
                f"Redis at {self.what} failed a retried command ({exc!r}); the first try "
                "may or may not have been applied"
            )
        return _translate(exc, sent=False, what=self.what)

    def claim_kind(self, kind_tag: str, params: Mapping[str, str] | None = None) -> None:
        """Mark the name as this kind of structure (first opener), or check that it is.

        The kind key ``safeshm:{NAME}`` is a hash ``{kind: ..., <params>...}``, written
        with HSETNX-like semantics in one script: another kind, or other parameters, under
        the name raise :class:`IncompatibleKeyError` and change nothing.
        """
        flat: list[str] = [kind_tag]
        for k, v in (params or {}).items():
            flat += [k, v]
        found = self.call(
            lambda c: self.script(_CLAIM_KIND)(keys=[self.kind_key], args=flat),
            idempotent=True,
        )
        if found != b"ok":
            text = found.decode() if isinstance(found, bytes) else str(found)
            raise IncompatibleKeyError(f"cannot open {self.what}: {text}")

    def close(self) -> None:
        """Close this handle: its client's connections are released. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(rex.RedisError):
            self.client.close()

    def delete_all(self) -> None:
        """Delete every key of the structure (``unlink()``): idempotent."""
        pattern = f"{KEY_PREFIX}{{{self.name}}}*"

        def run(c: Any) -> None:
            keys = list(c.scan_iter(match=pattern, count=1000))
            if keys:
                c.delete(*keys)

        self.call(run, idempotent=True)


# KEYS[1] the kind key; ARGV[1] the kind, then (name, value) pairs of parameters.
_CLAIM_KIND: Final = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
    redis.call('HSET', KEYS[1], 'kind', ARGV[1])
    for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    return 'ok'
end
if t ~= 'hash' then
    return 'the key ' .. KEYS[1] .. ' holds a Redis ' .. t .. ', not a safeshm structure'
end
local kind = redis.call('HGET', KEYS[1], 'kind')
if kind ~= ARGV[1] then
    return 'it is a ' .. tostring(kind) .. ', not a ' .. ARGV[1]
end
for i = 2, #ARGV, 2 do
    local have = redis.call('HGET', KEYS[1], ARGV[i])
    if have == false then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    elseif have ~= ARGV[i + 1] then
        return 'it was created with ' .. ARGV[i] .. '=' .. have .. ', not ' .. ARGV[i + 1]
    end
end
return 'ok'
"""


Backend = Literal["shm", "redis"]


class RedisStructure:
    """The lifecycle every Redis-backed structure shares.

    ``open(url, ...)`` claims the name for the kind (or checks it), ``close()`` releases
    this handle's connections (idempotent; later use raises
    :class:`~safeshm.HandleClosedError`), ``unlink()`` deletes every key of the structure
    for everyone, ``with X.open(url) as x:`` closes on exit (never deletes: the structure
    is shared), and a handle pickles as its URL and options, so a pool's worker reopens it.
    """

    _kind: ClassVar[str] = ""  # the class name, in messages
    _kind_tag: ClassVar[str] = ""  # stored in the kind key

    def __init__(self, url: str, params: Mapping[str, str] | None = None) -> None:
        self._conn = Connection(type(self).__name__, url)
        try:
            self._conn.claim_kind(self._kind_tag, params)
        except BaseException:
            self._conn.close()
            raise

    @property
    def name(self) -> str:
        """The structure's name (the URL's fragment)."""
        return self._conn.name

    @property
    def url(self) -> str:
        """The URL this handle was opened with."""
        return self._conn.url

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def close(self) -> None:
        """Close this handle (its connections); idempotent. The data stays."""
        self._conn.close()

    def unlink(self) -> None:
        """Delete the structure (every key under its name) for everyone. Idempotent, and
        works on a closed handle too (as a shared-memory structure's does)."""
        if not self._conn.closed:
            self._conn.delete_all()
            return
        conn = Connection(self._conn.kind, self._conn.url)
        try:
            conn.delete_all()
        finally:
            conn.close()

    def _reopen_args(self) -> tuple[Any, ...]:
        """What ``__reduce__`` passes to ``type(self)._reopen``: the URL, then options."""
        return (self.url,)

    def __reduce__(self) -> tuple[Any, ...]:
        self._conn.check_open()
        return (type(self)._reopen, self._reopen_args())

    @classmethod
    def _reopen(cls, *args: Any) -> Self:
        return cls(*args)

    def __enter__(self) -> Self:
        self._conn.check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.name!r} at {_redact(self.url)} ({state})>"
