"""Real servers on 127.0.0.1 whose workers share rate limits through ``shm://``.

gunicorn (3 sync workers) serving flask + flask-limiter, and uvicorn (``--workers 3``)
serving FastAPI + slowapi: requests over a limit are refused exactly, whichever worker
serves them; a short window expires; a SIGKILLed gunicorn worker is replaced and the
limits still hold exactly.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("SAFESHM_NO_EXTENSIONS") == "1",
    reason="server integration runs once per Python, on the compiled core; the ctypes "
    "path is covered by the unit tests",
)

pytest.importorskip("limits")

from safeshm.ratelimit import RateLimitTable  # noqa: E402
from tests._servers import ServerProcess  # noqa: E402

WORKERS = 3
CLIENTS = 6
LIMIT = 25
REQUESTS = 70
TIMEOUT = 60.0


class Server(ServerProcess):
    """A server whose answers carry the worker's pid (``X-Pid``)."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
        super().__init__(cmd, log_path, env, timeout=TIMEOUT)

    def get(self, path: str) -> tuple[int, int]:
        """GET ``path``: the status, and the pid of the worker that answered."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status, int(resp.getheader("X-Pid") or 0)
        finally:
            conn.close()

    def wait_ready(self) -> None:
        """Until every worker has answered (uvicorn's workers boot after the master
        listens, and one that is ready early would serve a whole burst alone)."""
        deadline = time.monotonic() + TIMEOUT
        seen: set[int] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, pid = self.get("/pid")
                if status == 200:
                    seen.add(pid)
                    if len(seen) >= WORKERS:
                        return
            time.sleep(0.02)
        pytest.fail(f"{len(seen)} of {WORKERS} workers answered within {TIMEOUT} s:\n{self.log()}")


def burst(server: Server, path: str, total: int) -> tuple[Counter[int], set[int]]:
    """``total`` GETs from CLIENTS threads: statuses, and the pids that answered."""
    statuses: Counter[int] = Counter()
    pids: set[int] = set()
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(range(total))

    def client() -> None:
        try:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                status, pid = server.get(path)
                with lock:
                    statuses[status] += 1
                    pids.add(pid)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "requests did not complete"
    assert not errors, errors[0]
    return statuses, pids


@contextlib.contextmanager
def served(  # noqa: PLR0917
    cmd: list[str], pattern: str, tmp_path: Path, name: str, strategy: str, port: int = 0
) -> Iterator[Server]:
    table = RateLimitTable.create(name=name, keys=1024)
    env = dict(
        os.environ,
        SAFESHM_TEST_RL_TABLE=name,
        SAFESHM_TEST_RL_LIMIT=f"{LIMIT}/minute",
        SAFESHM_TEST_RL_STRATEGY=strategy,
    )
    env.pop("GUNICORN_CMD_ARGS", None)
    server = Server(cmd, tmp_path / "server.log", env)
    try:
        server.wait_listening(pattern, port)
        server.wait_ready()
        yield server
    except BaseException:
        print(f"--- server log ---\n{server.log()}")
        raise
    finally:
        server.stop()
        table.check_consistency()
        table.close()
        table.unlink()


def check_limit_and_expiry(server: Server) -> None:
    statuses, pids = burst(server, "/limited", REQUESTS)
    assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}
    assert len(pids) >= 2, f"one worker served everything: {pids}"
    # A 3-per-second window: refused at once, free again a second later.
    statuses, _ = burst(server, "/short", 5)
    assert statuses == {200: 3, 429: 2}
    time.sleep(1.1)
    assert server.get("/short")[0] == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_gunicorn_flask_limiter(tmp_path: Path, name: str) -> None:
    pytest.importorskip("gunicorn")
    pytest.importorskip("flask_limiter")
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:tests._ratelimit_apps",
        "--workers",
        str(WORKERS),
        "--bind",
        "127.0.0.1:0",
        "tests._ratelimit_apps:flask_app",
    ]
    with served(
        cmd, r"Listening at: http://127\.0\.0\.1:(\d+)", tmp_path, name, "fixed-window"
    ) as server:
        check_limit_and_expiry(server)
        # SIGKILL a worker (maybe mid-request): gunicorn replaces it, limits hold exactly.
        before = server.workers()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while not (len(server.workers()) == WORKERS and victim not in server.workers()):
            assert time.monotonic() < deadline, "gunicorn did not replace the worker"
            time.sleep(0.05)
        statuses, _ = burst(server, "/after", REQUESTS)
        assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}


@pytest.mark.timeout(120)
def test_uvicorn_slowapi(tmp_path: Path, name: str) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("slowapi")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--workers",
        str(WORKERS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "tests._ratelimit_apps:fastapi_app",
    ]
    with served(cmd, r"Uvicorn running on", tmp_path, name, "moving-window", port) as server:
        check_limit_and_expiry(server)
        statuses, _ = burst(server, "/after", REQUESTS)
        assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}
