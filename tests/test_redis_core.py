"""The Redis backend's connection layer against real servers: typed errors, no retries."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from safeshm import (
    BackendAuthenticationError,
    BackendUnavailableError,
    HandleClosedError,
    IncompatibleKeyError,
    IncompatibleSegmentError,
    InvalidNameError,
    OutcomeUnknownError,
    SafeShmError,
)
from tests._redis_proxy import reply_dropping_proxy
from tests._redis_server import free_port, started

redis = pytest.importorskip("redis")

from safeshm.redis._core import Connection, parse_url  # noqa: E402 - after the skip


def test_parse_url() -> None:
    assert parse_url("redis://h:1/2#jobs") == ("redis://h:1/2", "jobs", False)
    assert parse_url("redis://h:1/2?cluster=1&socket_timeout=3#jobs") == (
        "redis://h:1/2?socket_timeout=3",
        "jobs",
        True,
    )
    assert parse_url("unix:///run/redis.sock?db=1#a.b")[1] == "a.b"
    for bad in ["http://h#x", "redis://h:1/0", "redis://h/0?cluster=maybe#x", "h:1#x"]:
        with pytest.raises(ValueError, match="URL"):
            parse_url(bad)
    with pytest.raises(InvalidNameError):
        parse_url("redis://h/0#a{b}")
    with pytest.raises(TypeError):
        parse_url(b"redis://h/0#x")  # type: ignore[arg-type]


def test_unreachable_server_is_backend_unavailable() -> None:
    conn = Connection("SafeCounter", f"redis://127.0.0.1:{free_port()}/0#c")
    with pytest.raises(BackendUnavailableError) as err:
        conn.call(lambda c: c.incrby(conn.key("v"), 1), idempotent=False)
    assert not isinstance(err.value, OutcomeUnknownError)
    assert isinstance(err.value, ConnectionError)
    conn.close()


def test_authentication(redis_server: Any) -> None:
    del redis_server
    with started(password="s3cret") as server:  # noqa: S106 - a test server's
        port = server.port
        for url in [f"redis://127.0.0.1:{port}/0#c", f"redis://:wrong@127.0.0.1:{port}/0#c"]:
            conn = Connection("SafeCounter", url)
            key = conn.key("v")
            with pytest.raises(BackendAuthenticationError) as err:
                conn.call(lambda c, key=key: c.incrby(key, 1), idempotent=False)
            assert isinstance(err.value, PermissionError) and "s3cret" not in str(err.value)
            conn.close()
        good = Connection("SafeCounter", f"redis://:s3cret@127.0.0.1:{port}/0#c")
        assert good.call(lambda c: c.get(good.key("v")), idempotent=True) is None  # unchanged
        assert "s3cret" not in good.what
        good.close()


def test_claim_kind(redis_url: Any) -> None:
    url = redis_url("k")
    a = Connection("SafeCounter", url)
    a.claim_kind("counter", {"width": "64"})
    a.claim_kind("counter", {"width": "64"})
    with pytest.raises(IncompatibleKeyError, match="not a queue"):
        Connection("SafeQueue", url).claim_kind("queue")
    with pytest.raises(IncompatibleKeyError, match="width=64, not 32"):
        Connection("SafeCounter", url).claim_kind("counter", {"width": "32"})
    # Not safeshm's: a plain string under the kind key. Nothing is changed.
    a.call(lambda c: c.set(a.kind_key, "theirs"), idempotent=True)
    with pytest.raises(IncompatibleKeyError, match="holds a Redis string") as err:
        a.claim_kind("counter")
    assert isinstance(err.value, IncompatibleSegmentError)
    assert a.call(lambda c: c.get(a.kind_key), idempotent=True) == b"theirs"
    # WRONGTYPE from any command is typed too.
    with pytest.raises(IncompatibleKeyError):
        a.call(lambda c: c.lpush(a.kind_key, 1), idempotent=False)
    a.delete_all()
    assert a.call(lambda c: c.exists(a.kind_key), idempotent=True) == 0
    a.close()


def test_closed_handle(redis_url: Any) -> None:
    conn = Connection("SafeCounter", redis_url("c"))
    conn.close()
    conn.close()
    with pytest.raises(HandleClosedError):
        conn.call(lambda c: c.ping(), idempotent=True)


def test_a_timed_out_write_is_not_retried(fresh_redis: Any) -> None:
    """redis-py 6+ retries a command whose reply timed out, by default: an INCRBY could
    be applied twice. Ours is not retried: OutcomeUnknownError, applied once."""
    conn = Connection("SafeCounter", f"{fresh_redis.url}?socket_timeout=0.3#c")
    key = conn.key("v")
    conn.call(lambda c: c.set(key, 0), idempotent=True)
    fresh_redis.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(OutcomeUnknownError) as err:
            conn.call(lambda c: c.incrby(key, 1), idempotent=False)
        assert time.monotonic() - t0 < 5
        assert isinstance(err.value, SafeShmError) and isinstance(err.value, ConnectionError)
    finally:
        fresh_redis.resume()
    # The write that was sent reaches the server once it runs again: once, not twice.
    deadline = time.monotonic() + 5
    while conn.call(lambda c: c.get(key), idempotent=True) != b"1":
        assert time.monotonic() < deadline, "the sent INCRBY never landed"
        time.sleep(0.01)
    time.sleep(0.5)
    assert conn.call(lambda c: c.get(key), idempotent=True) == b"1"
    conn.close()


def test_a_lost_reply_is_not_retried(redis_server: Any) -> None:
    """The command ran but its reply was lost with the connection: redis-py's default
    client (retries on since redis-py 6) sends it again and it is applied twice; ours
    raises OutcomeUnknownError and it was applied once."""
    with reply_dropping_proxy(redis_server.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0#lost-{os.getpid()}"
        conn = Connection("SafeCounter", url)
        key = conn.key("v")
        conn.call(lambda c: c.set(key, 0), idempotent=True)
        proxy.drop_next_reply()
        with pytest.raises(OutcomeUnknownError):
            conn.call(lambda c: c.incrby(key, 1), idempotent=False)
        assert proxy.dropped == 1
        assert conn.call(lambda c: c.get(key), idempotent=True) == b"1"
        # What users get from a plain redis-py client: the same loss, applied twice.
        plain = redis.Redis(host="127.0.0.1", port=proxy.port)
        plain.ping()  # connected: the next reply is INCRBY's
        proxy.drop_next_reply()
        assert plain.incrby(key, 1) == 3
        plain.close()
        conn.delete_all()
        conn.close()


def test_a_retried_idempotent_write_that_fails_again_is_outcome_unknown(
    redis_server: Any,
) -> None:
    """SET ran, its reply was lost, and the retry could not connect: the error must not be
    BackendUnavailableError (which promises that nothing was applied)."""
    with reply_dropping_proxy(redis_server.port) as proxy:
        conn = Connection("SafeCounter", f"redis://127.0.0.1:{proxy.port}/0#set-{os.getpid()}")
        key = conn.key("v")
        conn.call(lambda c: c.set(key, 0), idempotent=True)
        proxy.drop_next_reply(then_refuse=True)
        with pytest.raises(OutcomeUnknownError):
            conn.call(lambda c: c.set(key, 5), idempotent=True)
        conn.close()
    check = Connection("SafeCounter", f"{redis_server.url}#set-{os.getpid()}")
    assert check.call(lambda c: c.get(key), idempotent=True) == b"5"  # it was applied
    check.delete_all()
    check.close()


def test_close_from_another_thread_ends_calls_with_a_typed_error(redis_url: Any) -> None:
    conn = Connection("SafeCounter", redis_url("race"))
    key = conn.key("v")
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                conn.call(lambda c: c.incrby(key, 1), idempotent=False)
            except HandleClosedError:
                return
            except BaseException as exc:  # noqa: BLE001 - collected for the assert
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    conn.close()
    for t in threads:
        t.join(timeout=30)
    stop.set()
    assert not [t for t in threads if t.is_alive()]
    assert all(isinstance(e, SafeShmError) for e in errors), errors


def test_server_restart_reconnects(fresh_redis: Any) -> None:
    conn = Connection("SafeCounter", f"{fresh_redis.url}#c")
    key = conn.key("v")
    assert conn.call(lambda c: c.incrby(key, 5), idempotent=False) == 5
    fresh_redis.kill()
    with pytest.raises(BackendUnavailableError):
        conn.call(lambda c: c.incrby(key, 1), idempotent=False)
    fresh_redis.start()
    # Acknowledged with appendfsync always: still there after kill -9.
    assert conn.call(lambda c: c.incrby(key, 1), idempotent=False) == 6
    conn.close()


def test_reads_retry_once_on_a_dropped_connection(fresh_redis: Any) -> None:
    conn = Connection("SafeCounter", f"{fresh_redis.url}#c")
    key = conn.key("v")
    conn.call(lambda c: c.set(key, 7), idempotent=True)
    # Kill every client connection on the server side: the pooled connection is dead.
    admin = Connection("SafeCounter", f"{fresh_redis.url}#admin")
    admin.call(lambda c: c.client_kill_filter(_type="normal", skipme=True), idempotent=True)
    assert conn.call(lambda c: c.get(key), idempotent=True) == b"7"
    admin.close()
    conn.close()


def test_threads_share_a_connection(redis_url: Any) -> None:
    conn = Connection("SafeCounter", redis_url("c"))
    key = conn.key("v")

    def work() -> None:
        for _ in range(200):
            conn.call(lambda c: c.incrby(key, 1), idempotent=False)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert conn.call(lambda c: c.get(key), idempotent=True) == b"800"
    conn.delete_all()
    conn.close()
