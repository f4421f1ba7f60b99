"""A WSGI app whose counters live wherever a URL says: one host or many.

The same code serves one machine's gunicorn workers with shared memory and a fleet of
machines with Redis; only the environment changes:

* ``MYAPP_REQUESTS_URL``: an exact counter that numbers requests (default
  ``shm://myapp.requests``; ``redis://HOST:6379/0#myapp.requests`` on a fleet);
* ``MYAPP_HITS_URL``: a write-heavy hit counter, sharded (default ``shm://myapp.hits``; on
  Redis each host counts locally and publishes its total every ``MYAPP_FLUSH`` seconds).

Run it on each host (from this directory)::

    MYAPP_REQUESTS_URL=redis://redis.internal:6379/0#myapp.requests \\
    MYAPP_HITS_URL=redis://redis.internal:6379/0#myapp.hits \\
        gunicorn --workers 4 fleet_app:app

``python fleet_app.py`` runs a self-check: it calls the app the way a WSGI server would,
with the URLs of its environment (shared memory by default), and cleans up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.util import setup_testing_defaults

import safeshm
from safeshm import SharedCounter, SharedShardedCounter

_requests: SharedCounter | None = None
_hits: SharedShardedCounter | None = None


def requests_counter() -> SharedCounter:
    """This worker's handle on the request numbers, opened on first use."""
    global _requests  # noqa: PLW0603 - one handle per worker process, made on demand
    if _requests is None:
        _requests = safeshm.open_counter(
            os.environ.get("MYAPP_REQUESTS_URL", "shm://myapp.requests")
        )
    return _requests


def hits_counter() -> SharedShardedCounter:
    """This worker's handle on the hit counter, opened on first use."""
    global _hits  # noqa: PLW0603 - one handle per worker process, made on demand
    if _hits is None:
        url = os.environ.get("MYAPP_HITS_URL", "shm://myapp.hits")
        if url.startswith("shm://"):
            _hits = safeshm.open_counter(url, sharded=True)
        else:  # a fleet: count locally, publish this host's total now and then
            _hits = safeshm.open_counter(
                url,
                sharded=True,
                flush_interval=float(os.environ.get("MYAPP_FLUSH", "1.0")),
                host_id=os.environ.get("MYAPP_HOST_ID"),  # default: the host name
            )
    return _hits


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/hits":
        body = f"{hits_counter().value}\n".encode()
    else:
        hits_counter().add()  # no network: a local add, published later
        number = requests_counter().add()  # exact across every worker of every host
        body = f"{number}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def main() -> None:
    global _requests, _hits  # noqa: PLW0603 - reset the cached handles after the check
    statuses: list[str] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        statuses.append(status)
        return lambda data: None

    def get(path: str) -> int:
        environ: WSGIEnvironment = {}
        setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        return int(b"".join(app(environ, start_response)))

    numbers = [get("/") for _ in range(3)]
    print("request numbers:", *numbers)
    requests, hits = requests_counter(), hits_counter()
    try:
        flush = getattr(hits, "flush", None)
        if flush is not None:
            flush()  # a fleet counter: publish now rather than in a second
        if numbers != [numbers[0], numbers[0] + 1, numbers[0] + 2] or get("/hits") < 3:
            raise SystemExit(f"unexpected: {numbers}, hits={hits.value}")
    finally:
        for counter in (requests, hits):
            counter.unlink()
            counter.close()
        _requests = _hits = None
    if statuses != ["200 OK"] * 4:
        raise SystemExit(f"unexpected statuses: {statuses}")


if __name__ == "__main__":
    main()
