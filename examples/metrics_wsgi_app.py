"""A WSGI app whose gunicorn workers add up their Prometheus metrics in shared memory.

Run it (from this directory)::

    gunicorn --workers 4 metrics_wsgi_app:app

No configuration file, no ``child_exit`` hook, no ``PROMETHEUS_MULTIPROC_DIR``: each
worker imports this module, whose ``configure()`` line creates the registry or attaches
to it, and ``/metrics`` shows the sum over every worker that ever ran -- the killed and
recycled ones included.

``python metrics_wsgi_app.py`` runs a self-check without gunicorn: three forked
processes, standing in for workers, each serve five requests through the app and exit;
then ``/metrics`` shows fifteen, and the registry is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.util import setup_testing_defaults

from prometheus_client import CollectorRegistry, make_wsgi_app

import safeshm.metrics
from safeshm.metrics import Collector, Counter, Gauge, Histogram

# The same definitions as with prometheus_client; only the import changed.
REQUESTS = Counter("myapp_requests", "Requests served", ["path", "code"])
LATENCY = Histogram("myapp_request_seconds", "Time spent serving a request")
INFLIGHT = Gauge("myapp_inflight_requests", "Requests being served")  # livesum: live workers

if __name__ == "__main__":  # the self-check at the bottom uses a registry of its own
    os.environ.setdefault("MYAPP_METRICS", f"myapp.selfcheck-{os.getpid()}")
# The one line of setup: the first process creates the registry, the others attach.
REGISTRY = safeshm.metrics.configure(os.environ.get("MYAPP_METRICS", "myapp.metrics"))

# The standard exposition, of everything in the registry.
EXPOSITION = CollectorRegistry()
EXPOSITION.register(Collector())
metrics_app = make_wsgi_app(EXPOSITION)

ROUTES = frozenset({"/", "/hello"})


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        exposition: Iterable[bytes] = metrics_app(environ, start_response)
        return exposition
    with INFLIGHT.track_inprogress(), LATENCY.time():
        body = f"hello from worker {os.getpid()}\n".encode()
    # A label value from a fixed set, never the raw path: clients choose paths.
    REQUESTS.labels(path if path in ROUTES else "other", "200").inc()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def get(path: str) -> tuple[str, bytes]:
    """Call the app the way a WSGI server does; its status and body."""
    environ: WSGIEnvironment = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    statuses: list[str] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        statuses.append(status)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    return statuses[0], body


def main() -> None:
    try:
        for _ in range(3):  # three "workers", each serving five requests
            pid = os.fork()
            if pid == 0:
                ok = False
                try:
                    ok = all(get("/")[0] == "200 OK" for _ in range(5))
                finally:
                    os._exit(0 if ok else 1)  # no clean-up, as a killed worker
            if os.waitpid(pid, 0)[1] != 0:
                raise SystemExit("a worker failed")
        status, body = get("/metrics")
        lines = [line for line in body.decode().splitlines() if line.startswith("myapp_")]
        print(*lines, sep="\n")
        if status != "200 OK" or 'myapp_requests_total{code="200",path="/"} 15.0' not in lines:
            raise SystemExit(f"unexpected: {status}\n{body.decode()}")
    finally:
        REGISTRY.close()
        REGISTRY.unlink()


if __name__ == "__main__":
    main()
