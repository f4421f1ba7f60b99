"""A FastAPI app whose uvicorn workers add up their Prometheus metrics in shared memory.

Run it (from this directory)::

    uvicorn metrics_asgi_app:app --workers 4

Each worker process imports this module; its ``configure()`` line creates the registry
or attaches to it, and ``/metrics/`` (prometheus_client's ASGI app, mounted) shows the
sum over every worker, however often uvicorn restarts them.

``python metrics_asgi_app.py`` runs a self-check without uvicorn: two forked processes,
standing in for workers, each serve three requests through the ASGI app and exit; then
``/metrics/`` shows six, and the registry is removed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, make_asgi_app

import safeshm.metrics
from safeshm.metrics import Collector, Counter

REQUESTS = Counter("myapp_requests", "Requests served", ["path", "code"])

if __name__ == "__main__":  # the self-check at the bottom uses a registry of its own
    os.environ.setdefault("MYAPP_METRICS", f"myapp.selfcheck-{os.getpid()}")
REGISTRY = safeshm.metrics.configure(os.environ.get("MYAPP_METRICS", "myapp.metrics"))
EXPOSITION = CollectorRegistry()
EXPOSITION.register(Collector())

app = FastAPI()
app.mount("/metrics", make_asgi_app(registry=EXPOSITION))


@app.get("/")
def index() -> dict[str, int]:
    REQUESTS.labels("/", "200").inc()
    return {"worker": os.getpid()}


async def get(path: str) -> tuple[int, bytes]:
    """Call the app the way an ASGI server does; its status and body."""
    sent: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def main() -> None:
    try:
        for _ in range(2):  # two "workers", each serving three requests
            pid = os.fork()
            if pid == 0:
                ok = False
                try:
                    ok = all(asyncio.run(get("/"))[0] == 200 for _ in range(3))
                finally:
                    os._exit(0 if ok else 1)  # no clean-up, as a killed worker
            if os.waitpid(pid, 0)[1] != 0:
                raise SystemExit("a worker failed")
        status, body = asyncio.run(get("/metrics/"))
        lines = [line for line in body.decode().splitlines() if line.startswith("myapp_")]
        print(*lines, sep="\n")
        if status != 200 or 'myapp_requests_total{code="200",path="/"} 6.0' not in lines:
            raise SystemExit(f"unexpected: {status}\n{body.decode()}")
    finally:
        REGISTRY.close()
        REGISTRY.unlink()


if __name__ == "__main__":
    main()
