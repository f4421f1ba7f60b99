"""``safeshm.metrics`` under a real gunicorn whose workers are SIGKILLed and replaced.

``python -m gunicorn`` with three sync workers serves ``tests/_metrics_apps.py`` on a
free port of 127.0.0.1 -- no ``child_exit`` hook, no ``PROMETHEUS_MULTIPROC_DIR``, a
registry with few rows so that the rows of killed workers must be reused. Client threads
send ``/work`` requests while the test SIGKILLs one worker after another, and
``/metrics`` is scraped over HTTP and parsed with ``prometheus_client.parser``.

Ground truth, and why the comparison can be exact. A request whose worker is killed
between its ``inc()`` and its reply is counted by the server but seen as an error by the
client; killing workers at random would make every such request ambiguous. So the test
kills only workers whose state it knows, and the two kinds of kill cover both the
"killed after counting" and the "killed inside ``inc()``" cases:

* ``/block`` counts itself, then sends the first line of its answer (its pid) and
  sleeps. Once the test has read that line, the request is known to be counted and the
  worker to be asleep, outside any ``inc()``: it is SIGKILLed, its client gets a cut
  answer, and the request must still be counted -- once. Its in-flight gauge stays at 1
  in the dead worker's row, and the ``livesum`` gauge must drop it.
* ``/spin`` sends its pid, then calls ``spins.inc()`` in a tight loop until it is
  SIGKILLed, most likely inside an ``inc()``. Nobody knows how many increments it made,
  so ``spins`` is only checked to never go backwards and to stay put once the spinners
  are dead; but the same rows hold the worker's other series, which must come out exact.
* A gunicorn sync worker serves one connection at a time, and accepts the next only when
  it has answered the last, so a worker blocked in ``/block`` or spinning in ``/spin``
  holds no ``/work`` request: every ``/work`` request must get its 200, and be counted
  exactly once in the labelled counter and the histogram (its observed values are
  dyadic fractions, so even the float sum is exact).

Every scrape during the kills must show counters and histogram buckets that never went
backwards. After the load, one more ``/block`` worker is killed with no load running, so
that its row (in-flight gauge at 1) is not yet reused at the final scrape: ``livesum``
must still read 0. The counts must be exact; the registry's statistics must show that
every write had a row of its own (the killed workers' rows were reused: no write went
through the locked fallback) and no warning may be logged. After the server has stopped,
a process that defined no metric reads the same values from the registry; then the test
unlinks it and nothing is left in SAFESHM_DIR.

Mutations of a private copy of ``safeshm/metrics/_registry.py`` that this test caught:
clearing a reused row's cells (counts of dead workers lost), ``live*`` gauges counting
dead rows, never reusing a dead owner's row, and a scrape that skips the last row.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safeshm import _compat

pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from tests._servers import ServerProcess
from tests.test_integration_gunicorn import Server, in_use

pytestmark = pytest.mark.skipif(
    os.environ.get("SAFESHM_NO_EXTENSIONS") == "1",
    reason="server integration runs once per Python, on the compiled core; the ctypes path "
    "is covered by the unit tests",
)

WORKERS = 3
ROWS = 6  # WORKERS live ones and a few more: the rows of killed workers must be reused
KILLS = ("/block", "/block", "/spin", "/block", "/spin", "/block", "/block")
CLIENT_THREADS = 4
MIN_WORK = 1000  # /work requests answered, at least
# Dyadic fractions: their float sum is exact. One under each bucket bound, one over all.
VALUES = (0.0078125, 0.0625, 0.5, 4.0)
BUCKETS = (0.01, 0.1, 1.0)
TIMEOUT = 30.0  # any single wait, generous for a loaded CI machine

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
WORK_SERIES = ("http_requests_total", (("code", "200"), ("path", "/work")))
BLOCK_SERIES = ("http_requests_total", (("code", "200"), ("path", "/block")))


class MetricsServer(Server):
    """test_integration_gunicorn's server (its requests), serving ``tests._metrics_apps``
    without a configuration file (so without hooks)."""

    def __init__(self, log_path: Path, env: dict[str, str], preload: bool) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(WORKERS),
            "--worker-class",
            "sync",
            "--bind",
            "127.0.0.1:0",
            "--timeout",
            "120",  # a worker is never restarted for being slow, only when killed
            "--graceful-timeout",
            "10",
            "--no-control-socket",
            *(["--preload"] if preload else []),
            "tests._metrics_apps:application",
        ]
        ServerProcess.__init__(self, cmd, log_path, env, timeout=TIMEOUT)

    def wait_ready(self, exclude: set[int]) -> set[int]:
        """Wait until WORKERS workers, none in ``exclude``, have each answered /pid."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}")
            pids = self.workers()
            if len(pids) == WORKERS and not pids & exclude:
                seen = {int(self.get("/pid")) for _ in range(100)}
                if seen == pids:
                    return pids
            time.sleep(0.05)
        pytest.fail(f"gunicorn did not run {WORKERS} workers within {TIMEOUT} s")

    def scrape(self) -> Samples:
        text = self.get("/metrics").decode()
        return samples_of(text_string_to_metric_families(text))

    def stream(self, path: str) -> tuple[socket.socket, int]:
        """Send GET ``path``; return the connection and the pid on the answer's first
        line (HTTP/1.0: no chunked encoding)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1].endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                pytest.fail(f"GET {path}: connection closed after {data!r}")
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head
        return sock, int(body)


def samples_of(families: Any) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }


def monotonic_part(samples: Samples) -> Samples:
    """The samples that must never go backwards: counters and histogram series."""
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith(("_total", "_bucket", "_count", "_sum"))
    }


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    with sock:
        while chunk := sock.recv(4096):
            data += chunk
    return data


class Load:
    """CLIENT_THREADS threads sending /work until stopped; what they were answered."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.sent = dict.fromkeys(VALUES, 0)  # answered with a 200, by observed value
        self.answered = 0  # so far, all threads together
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(CLIENT_THREADS)
        ]

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        mine = dict.fromkeys(VALUES, 0)
        try:
            while not self._stop.is_set():
                v = rng.choice(VALUES)
                assert self.server.get(f"/work?v={v!r}") == b"ok"
                mine[v] += 1
                with self._lock:
                    self.answered += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.errors.append(e)
        with self._lock:
            for v, n in mine.items():
                self.sent[v] += n

    def wait_answered(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.answered < n and not self.errors:
            assert time.monotonic() < deadline, f"{n} /work requests took over {TIMEOUT} s"
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=TIMEOUT)
        if any(t.is_alive() for t in self._threads):
            pytest.fail(f"a /work client did not finish within {TIMEOUT} s")


@contextlib.contextmanager
def serving(log_path: Path, env: dict[str, str], preload: bool) -> Iterator[MetricsServer]:
    """A running server, always stopped on exit; its log printed if the block failed."""
    server = MetricsServer(log_path, env, preload)
    try:
        server.wait_listening()
        yield server
    except BaseException:
        server.stop()
        print(f"--- gunicorn log ---\n{server.log()}")
        raise
    finally:
        server.stop()


def _segments() -> set[str]:
    return {f for f in os.listdir(_compat.SHM_DIR) if f.startswith(_compat.FILE_PREFIX)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("preload", [False, True], ids=["import-in-worker", "preload"])
def test_counts_exact_while_workers_are_killed(preload: bool, tmp_path: Path) -> None:
    from safeshm.metrics import Collector, MetricsRegistry

    assert os.environ.get("SAFESHM_DIR") == _compat.SHM_DIR != "/dev/shm"
    before = _segments()
    name = f"t{os.getpid()}-gunicorn-metrics-{int(preload)}"
    env = dict(os.environ, SAFESHM_TEST_METRICS=name, SAFESHM_TEST_METRICS_ROWS=str(ROWS))
    env.pop("GUNICORN_CMD_ARGS", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    killed: set[int] = set()
    blocked = spun = 0
    scrapes: list[Samples] = []
    try:
        with serving(tmp_path / "gunicorn.log", env, preload) as server:
            server.wait_ready(exclude=set())
            scrapes.append(server.scrape())

            def kill(path: str) -> None:
                """One request to ``path``, its worker SIGKILLed; wait for a new one."""
                nonlocal blocked, spun
                sock, pid = server.stream(path)
                assert pid not in killed
                if path == "/spin":
                    time.sleep(0.05)  # well into its loop of inc()
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                assert b"not killed" not in read_to_eof(sock)
                blocked += path == "/block"
                spun += path == "/spin"
                scrape = server.scrape()
                assert scrape[BLOCK_SERIES] == blocked  # each counted once, dead or not
                assert scrape.get(("spins_total", ()), 0.0) >= spun
                scrapes.append(scrape)
                deadline = time.monotonic() + TIMEOUT
                while len(server.workers() - killed) < WORKERS:
                    assert time.monotonic() < deadline, "gunicorn replaced no worker"
                    time.sleep(0.02)

            with Load(server) as load:
                for path in KILLS:
                    kill(path)
                load.wait_answered(MIN_WORK)
            if load.errors:
                pytest.fail(f"{len(load.errors)} /work client(s) failed: {load.errors[0]!r}")
            # One more, without load: the new worker writes nothing, so the dead worker's
            # row, in-flight gauge at 1, is not reused before the scrape below.
            kill("/block")

            server.wait_ready(exclude=killed)
            final = server.scrape()
            scrapes.append(final)
            # Counters and histograms never went backwards, from scrape to scrape.
            for earlier, later in itertools.pairwise(scrapes):
                earlier_m, later_m = monotonic_part(earlier), monotonic_part(later)
                assert later_m.keys() >= earlier_m.keys()
                went_back = {k: (v, later_m[k]) for k, v in earlier_m.items() if later_m[k] < v}
                assert went_back == {}

            work = sum(load.sent.values())
            assert work > 0
            assert final[WORK_SERIES] == work
            assert final[BLOCK_SERIES] == blocked
            assert final[("work_seconds_count", ())] == work
            assert final[("work_seconds_sum", ())] == sum(v * n for v, n in load.sent.items())
            for bound in (*BUCKETS, float("inf")):
                expected = sum(n for v, n in load.sent.items() if v <= bound)
                le = "+Inf" if bound == float("inf") else str(bound)
                assert final[("work_seconds_bucket", (("le", le),))] == expected, le
            # Live sum over live workers: the killed ones died with a request in flight (the
            # last one's row still holds it).
            assert final[("inflight", ())] == 0
            # The spinners are dead: their increments are all in, and stay put.
            assert server.scrape()[("spins_total", ())] == final[("spins_total", ())] >= spun

            returncode = server.stop()
            log = server.log()
            assert returncode == 0, f"gunicorn exited with {returncode}:\n{log}"
            assert "Traceback" not in log, log
            assert "SafeShmWarning" not in log, log

        # Every worker is gone: a process that defined nothing exports the same counts.
        assert not in_use(name)
        registry = MetricsRegistry.attach(name)
        try:
            after = samples_of(Collector(registry=registry).collect())
            statistics = registry.statistics()
        finally:
            registry.close()
        # Each worker wrote from two rows (its thread's, its gauges'), and more than ROWS / 2
        # workers ran: the rows of killed workers were reused, every write
        # had a row of its own (none went through the locked fallback).
        assert statistics.rows_ever_used == ROWS < 2 * (WORKERS + len(KILLS))
        assert statistics.locked_adds == 0
        assert monotonic_part(after) == monotonic_part(final)
        assert after[("inflight", ())] == 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            leftover = MetricsRegistry.attach(name)
            leftover.close()
            leftover.unlink()
    assert _segments() <= before
