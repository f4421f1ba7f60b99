"""A WSGI app whose gunicorn workers count requests in one shared counter.

The gunicorn master creates the counter (see ``gunicorn_conf.py``) and passes its
name to the workers in the environment; each worker attaches on its first request.

Run it (from this directory)::

    gunicorn -c gunicorn_conf.py gunicorn_app:app

``python gunicorn_app.py`` runs a self-check without gunicorn: it plays the master
(creates the counter), calls the app the way a WSGI server would, and cleans up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.util import setup_testing_defaults

from safeshm import SafeCounter

COUNTER_ENV = "MYAPP_REQUESTS_COUNTER"
"""The environment variable by which the master tells workers the counter's name."""

_requests: SafeCounter | None = None


def requests_counter() -> SafeCounter:
    """This worker's handle on the shared counter, attached on first use."""
    global _requests  # noqa: PLW0603 - one handle per worker process, made on demand
    if _requests is None:
        _requests = SafeCounter.attach(os.environ[COUNTER_ENV])
    return _requests


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    # Atomic across every worker: no two requests get the same number.
    number = requests_counter().add()
    body = f"request #{number}, served by worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def main() -> None:
    global _requests  # noqa: PLW0603 - reset the cached handle after the check
    with SafeCounter.create() as counter:  # what gunicorn_conf.on_starting does
        os.environ[COUNTER_ENV] = counter.name
        statuses: list[str] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: object = None
        ) -> Callable[[bytes], object]:
            statuses.append(status)
            return lambda data: None

        environ: WSGIEnvironment = {}
        setup_testing_defaults(environ)
        bodies = [b"".join(app(environ, start_response)) for _ in range(3)]
        print(*(b.decode().strip() for b in bodies), sep="\n")
        if statuses != ["200 OK"] * 3 or counter.value != 3:
            raise SystemExit(f"unexpected: {statuses}, counter={counter.value}")
        if _requests is not None:
            _requests.close()
            _requests = None
    del os.environ[COUNTER_ENV]


if __name__ == "__main__":
    main()
