"""A real gunicorn server whose sync workers count requests in safeshm structures.

Not a mock: ``python -m gunicorn`` with several worker processes serves
``tests/_wsgi_app.py`` on a free port of 127.0.0.1; client threads send a few thousand
requests; the counts in shared memory must be exact, across a ``SIGHUP`` reload that
replaces every worker, and nothing may be left behind once the server has stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import safeshm
from safeshm import _compat
from tests._servers import ServerProcess

pytest.importorskip("gunicorn")

WORKERS = 3
CLIENT_THREADS = 6
REQUESTS_PER_PHASE = 1000
PER_WORKER_SLOTS = 64  # far more than WORKERS * 2: room for any worker gunicorn restarts
# Generous, for a loaded CI machine (a run takes a second or two); the test's own
# pytest-timeout covers their sum, so a stuck step fails with its own message.
STARTUP_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
PHASE_TIMEOUT = 100.0
STOP_TIMEOUT = 60.0


class Reply(NamedTuple):
    """What GET /count answers: who served it, and what its adds returned."""

    pid: int
    slot: int
    total: int  # the request counter after this request
    mine: int  # this worker's count after this request


class Server(ServerProcess):
    """A gunicorn master (``tests._wsgi_app``, with its configuration file's hooks)."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:tests._wsgi_app",
            "--workers",
            str(WORKERS),
            "--bind",
            "127.0.0.1:0",
            "tests._wsgi_app:application",
        ]
        super().__init__(cmd, log_path, env, timeout=STARTUP_TIMEOUT)

    def get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise AssertionError(f"GET {path}: HTTP {resp.status}: {body!r}")
        return body

    def wait_workers(self, exclude: set[int]) -> set[int]:
        """Wait until exactly WORKERS workers run, none of them in ``exclude``, and each
        has answered a request (it is booted and has claimed its slot)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}")
            pids = self.workers()
            if len(pids) == WORKERS and not pids & exclude:
                seen: set[int] = set()
                for _ in range(200):  # requests land on whichever worker accepts first
                    info = json.loads(self.get("/info"))
                    assert info["slot"] is not None
                    seen.add(info["pid"])
                    if seen >= pids:
                        break
                if seen == pids:  # no worker was replaced meanwhile
                    return pids
            time.sleep(0.1)
        pytest.fail(
            f"gunicorn did not run {WORKERS} fresh workers within {STARTUP_TIMEOUT} s "
            f"(children: {sorted(self.workers())}, old: {sorted(exclude)})"
        )


@contextlib.contextmanager
def gunicorn(log_path: Path, env: dict[str, str]) -> Iterator[Server]:
    """A running server, always stopped on exit; if the block failed, its log is printed
    (pytest shows it with the failure)."""
    server = Server(log_path, env)
    try:
        server.wait_listening()
        yield server
    except BaseException:
        server.stop(STOP_TIMEOUT)
        print(f"--- gunicorn log ---\n{server.log()}")
        raise
    finally:
        server.stop(STOP_TIMEOUT)


def send_requests(
    server: Server, total: int, midway: Callable[[], None] | None = None
) -> list[Reply]:
    """``total`` GET /count from CLIENT_THREADS threads; every reply.

    ``midway`` is called from this thread once a third of the requests have been sent,
    while the others are still in flight.
    """
    replies: list[Reply] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(range(total))
    sent = 0

    def client() -> None:
        nonlocal sent
        mine = []
        try:
            while True:
                with lock:
                    if next(todo, None) is None:
                        break
                    sent += 1
                mine.append(Reply(*map(int, server.get("/count").split())))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        with lock:
            replies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + PHASE_TIMEOUT
    if midway is not None:
        while sent < total // 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        midway()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        pytest.fail(f"{total} requests did not complete within {PHASE_TIMEOUT} s")
    if errors:
        pytest.fail(f"{len(errors)} client thread(s) failed; the first: {errors[0]!r}")
    assert len(replies) == total
    return replies


def in_use(name: str) -> bool:
    """Whether any process holds the segment open (every handle holds a shared flock)."""
    fd = os.open(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("attach_in", ["worker", "master"])
def test_gunicorn_workers_count_exactly_across_a_reload(attach_in: str, tmp_path: Path) -> None:
    # conftest gave this session its own SAFESHM_DIR through os.environ, so gunicorn and
    # its workers inherit it (checked below through the app): nothing here touches
    # /dev/shm itself.
    assert os.environ.get("SAFESHM_DIR") == _compat.SHM_DIR != "/dev/shm"
    before = {f for f in os.listdir(_compat.SHM_DIR) if f.startswith(_compat.FILE_PREFIX)}
    requests = safeshm.SafeCounter.create()
    sharded = safeshm.SafeCounter.create(sharded=True)
    slots = safeshm.SafeCounter.create()
    per_worker = safeshm.SafeArray.create("q", PER_WORKER_SLOTS)
    handles: list[Any] = [requests, sharded, slots, per_worker]
    names = [h.name for h in handles]
    env = dict(
        os.environ,
        SAFESHM_TEST_REQUESTS=requests.name,
        SAFESHM_TEST_SHARDED=sharded.name,
        SAFESHM_TEST_SLOTS=slots.name,
        SAFESHM_TEST_PER_WORKER=per_worker.name,
        SAFESHM_TEST_ATTACH_IN=attach_in,
    )
    env.pop("GUNICORN_CMD_ARGS", None)
    passed = False
    try:
        with gunicorn(tmp_path / "gunicorn.log", env) as server:
            info = json.loads(server.get("/info"))
            assert info["shm_dir"] == _compat.SHM_DIR
            first = server.wait_workers(exclude=set())

            replies = send_requests(server, REQUESTS_PER_PHASE)
            assert {r.pid for r in replies} <= first
            assert requests.value == sharded.value == REQUESTS_PER_PHASE
            assert sum(per_worker) == REQUESTS_PER_PHASE

            # A reload under load: gunicorn starts new workers and gracefully stops the
            # old ones (each finishes the request it is serving) while requests keep
            # coming. Not one may fail, or be counted twice or not at all.
            replies += send_requests(
                server, REQUESTS_PER_PHASE, midway=lambda: os.kill(server.proc.pid, signal.SIGHUP)
            )
            second = server.wait_workers(exclude=first)
            assert {r.pid for r in replies} <= first | second
            assert requests.value == sharded.value == 2 * REQUESTS_PER_PHASE
            assert sum(per_worker) == 2 * REQUESTS_PER_PHASE

            # Only the new workers now; the old ones are gone, their counts all stay, and
            # the sharded counter has folded their slots in.
            replies += send_requests(server, REQUESTS_PER_PHASE)
            assert {r.pid for r in replies[2 * REQUESTS_PER_PHASE :]} <= second
            total = 3 * REQUESTS_PER_PHASE
            assert requests.value == sharded.value == total
            # Every add returned a value no other add returned: each request got its own
            # number, 1 to total, with no gap and no repeat.
            assert sorted(r.total for r in replies) == list(range(1, total + 1))
            # Each worker claimed its own slot, and the slot holds exactly the requests
            # that worker answered, each of them numbered once.
            assert 2 * WORKERS <= slots.value <= PER_WORKER_SLOTS
            slot_of = {r.pid: r.slot for r in replies}
            assert len(set(slot_of.values())) == len(slot_of)
            answered = Counter(r.slot for r in replies)
            assert per_worker.to_list() == [answered[i] for i in range(PER_WORKER_SLOTS)]
            for slot, n in answered.items():
                assert sorted(r.mine for r in replies if r.slot == slot) == list(range(1, n + 1))

            returncode = server.stop(STOP_TIMEOUT)
            log = server.log()
            assert returncode == 0, f"gunicorn exited with {returncode}:\n{log}"
            assert "Traceback" not in log, log
        passed = True
    finally:
        for h in handles:
            h.close()
        if not passed:
            for h in handles:
                with contextlib.suppress(FileNotFoundError):
                    h.unlink()

    # Every gunicorn process has let go of every segment (no worker outlived the master).
    assert [n for n in names if in_use(n)] == []
    for h in handles:
        h.unlink()
    left = {f for f in os.listdir(_compat.SHM_DIR) if f.startswith(_compat.FILE_PREFIX)}
    assert left <= before
