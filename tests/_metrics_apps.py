"""A WSGI app that counts its requests in ``safeshm.metrics``, for ``test_metrics_gunicorn``.

Served as ``gunicorn tests._metrics_apps:application`` with sync workers and no
configuration file: no ``child_exit`` hook, no ``PROMETHEUS_MULTIPROC_DIR``. The metrics
are defined at import, as an application defines them, and the registry is configured on
the next line, whichever process imports the module first (each worker; or the master,
with ``--preload``, whose workers then inherit the registry through ``fork()``). The test
names the registry in ``SAFESHM_TEST_METRICS`` and its number of rows in
``SAFESHM_TEST_METRICS_ROWS`` (few: the rows of killed workers must be reused).

Endpoints:

* ``/work?v=X``: counts the request in ``http_requests{path="/work",code="200"}``,
  observes ``X`` in ``work_seconds`` and is in flight in ``inflight`` (livesum) while it
  runs; answers ``ok``.
* ``/block``: counts the request in ``http_requests{path="/block",code="200"}`` and goes
  in flight, then sends the first line of its answer (its pid) and sleeps: the test reads
  that line and SIGKILLs the worker, which is then known to have counted the request and
  to be inside no ``inc()``.
* ``/spin``: sends its pid, then increments ``spins`` in a tight loop: the test SIGKILLs
  the worker, most likely in the middle of an ``inc()``.
* ``/metrics``: the exposition, from a ``CollectorRegistry`` holding
  ``safeshm.metrics.Collector()``. Not counted.
* ``/pid``: the worker's pid. Not counted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import safeshm.metrics
from safeshm.metrics import Collector, Counter, Gauge, Histogram

BUCKETS = (0.01, 0.1, 1.0)
BLOCK_SECONDS = 60.0  # far longer than the test waits before it kills the worker
SPIN_SECONDS = 60.0

REQUESTS = Counter("http_requests", "Requests served", ["path", "code"])
INFLIGHT = Gauge("inflight", "Requests in flight", multiprocess_mode="livesum")
WORK = Histogram("work_seconds", "What /work was asked to observe", buckets=BUCKETS)
SPINS = Counter("spins", "Increments of /spin")

safeshm.metrics.configure(
    os.environ["SAFESHM_TEST_METRICS"], rows=int(os.environ.get("SAFESHM_TEST_METRICS_ROWS", "256"))
)

EXPOSITION = CollectorRegistry(auto_describe=True)
EXPOSITION.register(Collector())


def _block() -> Iterator[bytes]:
    with INFLIGHT.track_inprogress():
        REQUESTS.labels("/block", "200").inc()
        yield f"{os.getpid()}\n".encode()  # the sync worker sends it at once
        time.sleep(BLOCK_SECONDS)
        yield b"not killed\n"


def _spin() -> Iterator[bytes]:
    SPINS.inc()
    yield f"{os.getpid()}\n".encode()
    deadline = time.monotonic() + SPIN_SECONDS
    while time.monotonic() < deadline:
        for _ in range(1000):
            SPINS.inc()
    yield b"not killed\n"


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/work":
        with INFLIGHT.track_inprogress():
            value = float(parse_qs(environ.get("QUERY_STRING", ""))["v"][0])
            REQUESTS.labels("/work", "200").inc()
            WORK.observe(value)
        body = b"ok"
    elif path in ("/block", "/spin"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _block() if path == "/block" else _spin()
    elif path == "/metrics":
        body = generate_latest(EXPOSITION)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]
    elif path == "/pid":
        body = str(os.getpid()).encode()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
