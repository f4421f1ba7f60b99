"""Shared fixtures: leak detection, cleanup, hypothesis profiles, process hygiene."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Each test session gets a private directory on /dev/shm's tmpfs for its segments, set up
# before safeshm is imported (it reads SAFESHM_DIR once) and inherited by every child and
# subprocess the tests start. Concurrent test runs and benchmarks on the same machine
# then never see -- or delete -- each other's segments.
_SESSION_DIR: str | None = None
if "SAFESHM_DIR" not in os.environ:
    _SESSION_DIR = f"/dev/shm/safeshm-tests-{os.getpid()}"
    os.mkdir(_SESSION_DIR, 0o700)
    os.environ["SAFESHM_DIR"] = _SESSION_DIR

    def _remove_empty_session_dir(owner: int = os.getpid()) -> None:
        # Also when pytest stops before the session (a usage error): the directory goes
        # if it is empty; what a test leaked stays, for pytest_sessionfinish to report.
        if os.getpid() == owner and _SESSION_DIR is not None:
            with contextlib.suppress(OSError):
                os.rmdir(_SESSION_DIR)

    atexit.register(_remove_empty_session_dir)

from safeshm import _compat  # noqa: E402 - must follow the SAFESHM_DIR set-up

# -- hypothesis profiles ----------------------------------------------------------------------
# Multi-process examples cost tens of milliseconds each: no deadline, and health checks that
# assume cheap examples are off. `ci` is smaller and derandomized so CI runs are repeatable.
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _ours() -> set[str]:
    try:
        return {f for f in os.listdir(_compat.SHM_DIR) if f.startswith(_compat.FILE_PREFIX)}
    except FileNotFoundError:  # pragma: no cover
        return set()


@pytest.fixture(autouse=True)
def no_segment_leaks() -> Iterator[None]:
    """Fail any test that leaves a safeshm segment behind in /dev/shm (and remove it)."""
    before = _ours()
    yield
    leaked = _ours() - before
    for filename in leaked:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(_compat.SHM_DIR, filename))
    if leaked:
        pytest.fail(f"test leaked shared-memory segments: {sorted(leaked)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = sorted(os.listdir(_compat.SHM_DIR))
    if leftovers:
        session.exitstatus = 1
        print(f"\nFAILED: files left in {_compat.SHM_DIR} after the suite: {leftovers}")
    elif _SESSION_DIR is not None:
        os.rmdir(_SESSION_DIR)


_names = itertools.count()


@pytest.fixture
def name() -> str:
    """A segment name unique to this test (and process)."""
    return f"t{os.getpid()}-{next(_names)}"


@pytest.fixture
def unique() -> Callable[[], str]:
    """A factory of unique segment names."""
    return lambda: f"t{os.getpid()}-{next(_names)}"


@pytest.fixture
def cleanup() -> Iterator[Callable[[Any], Any]]:
    """Register handles to close and unlink at teardown, whatever the test did."""
    handles: list[Any] = []

    def register(handle: Any) -> Any:
        handles.append(handle)
        return handle

    yield register
    for h in reversed(handles):
        with contextlib.suppress(Exception):  # teardown must reach every handle
            h.close()
        with contextlib.suppress(FileNotFoundError):
            h.unlink()


@pytest.fixture
def remote() -> Iterator[Any]:
    """A server process holding handles, for state machines with a remote handle."""
    from ._helpers import Remote

    r = Remote("fork")
    try:
        yield r
    finally:
        r.stop()


def pytest_report_header() -> str:
    import safeshm
    from tests._impls import IMPLEMENTATION, NATIVE_BUILT

    return (
        f"safeshm implementation: {IMPLEMENTATION} (compiled core built: {NATIVE_BUILT}), "
        f"from {os.path.dirname(safeshm.__file__)}"
    )


# What the server integrations' tests import (the test extra installs them). They skip
# without them on a developer's machine; in CI (CI=true) a missing one stops the run, so
# that a skipped module never passes as green.
_INTEGRATION_MODULES = (
    "prometheus_client",
    "limits",
    "flask",
    "flask_limiter",
    "slowapi",
    "fastapi",
    "uvicorn",
    "gunicorn",
)


def _check_integrations_in_ci() -> None:
    if not os.environ.get("CI"):
        return
    import importlib.util

    missing = [m for m in _INTEGRATION_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.exit(f"CI needs {', '.join(missing)} (pip install -e '.[test]')", 1)


def pytest_sessionstart(session: pytest.Session) -> None:
    _check_redis_in_ci()
    _check_integrations_in_ci()
    # CI runs the suite once per implementation and sets this, so that a pass meant for the
    # compiled core cannot quietly test the ctypes fallback (a build that failed, an
    # extension that does not load) and report success.
    expected = os.environ.get("SAFESHM_EXPECT_IMPLEMENTATION")
    if expected and expected != _compat.implementation():
        pytest.exit(
            f"SAFESHM_EXPECT_IMPLEMENTATION={expected}, but this process uses the "
            f"{_compat.implementation()} implementation",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


# -- Redis ------------------------------------------------------------------------------------
# The Redis tests run against real redis-server processes that the session starts on free
# loopback ports (tests/_redis_server.py), never a system server. Without redis-server (or
# redis-py) they skip on a developer's machine and fail in CI (CI=true), where .ci/run
# installs both: a missing server must not pass as green.
_redis_names = itertools.count()


def _need_redis() -> None:
    from tests._redis_server import redis_server_binary

    missing = []
    if redis_server_binary() is None:
        missing.append("redis-server (Debian: apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("redis-py (pip install -e '.[test]')")
    if missing:
        what = " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {what} for the Redis tests", pytrace=False)
        pytest.skip(f"{what} not installed")


class _ExternalRedis:
    """The server that tests/test_redis_cluster.py started: a Redis Cluster."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """One redis-server for the session (AOF, appendfsync always); or, when
    SAFESHM_TEST_REDIS_URL is set (tests/test_redis_cluster.py runs the contract tests
    again that way), the Redis Cluster it names."""
    _need_redis()
    external = os.environ.get("SAFESHM_TEST_REDIS_URL")
    if external:
        yield _ExternalRedis(external)
        return
    from tests._redis_server import started

    with started() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: Any) -> Callable[[str], str]:
    """``redis_url(stem)`` -> a URL naming a structure no other test uses."""

    def make(stem: str = "t") -> str:
        return f"{redis_server.url}#{stem}-{os.getpid()}-{next(_redis_names)}"

    return make


@pytest.fixture
def fresh_redis() -> Iterator[Any]:
    """A redis-server of the test's own, to kill, pause and restart."""
    _need_redis()
    from tests._redis_server import started

    with started() as server:
        yield server


def _check_redis_in_ci() -> None:
    """In CI (CI=true), the Redis tests' server and client must be there: a module that
    skips for a missing redis-py, or a fixture that would skip for a missing server, would
    otherwise pass as green."""
    if not os.environ.get("CI"):
        return
    from tests._redis_server import redis_server_binary

    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.exit("CI needs redis-py for the Redis tests (pip install -e '.[test]')", 1)
    if redis_server_binary() is None:
        pytest.exit("CI needs redis-server for the Redis tests (apt-get install redis-server)", 1)


_REDIS_ONLY_REASON = (
    "the Redis backend runs no safeshm implementation code: its tests run in the compiled "
    "core's run of the suite"
)


def _redis_only(item: pytest.Item) -> bool:
    """Whether ``item`` tests the Redis backend and nothing of shared memory."""
    callspec = getattr(item, "callspec", None)
    ids = set(callspec.id.split("-")) if callspec is not None else set()
    if "redis" in ids:
        return True
    module = item.path.name
    if module == "test_open_url.py":
        return bool({"redis_server", "redis_url", "fresh_redis"} & set(item.fixturenames))
    if not module.startswith("test_redis_"):
        return False
    return not (ids & {"shm", "file"}) and "fleet" not in item.name and "shm" not in item.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With SAFESHM_TEST_REDIS_URL (the cluster run of tests/test_redis_cluster.py), only the
    contract tests' Redis cases run: those parametrized with the Redis backend that do not
    start, kill or pause a server of their own.

    On the ctypes fallback (CI's second run of the suite), the tests of the Redis backend
    alone are skipped: it runs no code of either implementation (redis-py and Lua in the
    server), so they run once per Python, in the compiled core's run. Their shared-memory
    cases (the contract tests' ``shm`` and ``file`` parameters, the fleet counters' local
    ``ShardedCounter``) still run."""
    if _compat.implementation() == "ctypes" and not os.environ.get("SAFESHM_TEST_REDIS_URL"):
        for item in items:
            if _redis_only(item):
                item.add_marker(pytest.mark.skip(reason=_REDIS_ONLY_REASON))
    if not os.environ.get("SAFESHM_TEST_REDIS_URL"):
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        fixtures = getattr(item, "fixturenames", ())
        contract = callspec is not None and "redis" in callspec.id.split("-")
        if contract and "fresh_redis" not in fixtures:
            keep.append(item)
        else:
            drop.append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
