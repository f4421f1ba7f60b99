"""gunicorn configuration: the master owns the shared request counter.

``on_starting`` runs in the master before any worker is forked: it creates the counter
and puts its name in the environment, which every worker inherits. ``on_exit`` runs in
the master when gunicorn shuts down: it removes the counter. Workers only attach
(``gunicorn_app.requests_counter``), so a worker that crashes or is replaced by gunicorn
leaves the counter, and every request it counted, in place.
"""

from __future__ import annotations

import os
from typing import Any

from safeshm import SafeCounter

bind = os.environ.get("MYAPP_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("MYAPP_WORKERS", "4"))

COUNTER_ENV = "MYAPP_REQUESTS_COUNTER"  # the name gunicorn_app.py reads
_counter: SafeCounter | None = None


def on_starting(server: Any) -> None:  # gunicorn's Arbiter (gunicorn ships no type hints)
    global _counter  # noqa: PLW0603 - the master's one handle, kept until on_exit
    _counter = SafeCounter.create()    # a random name: two gunicorns never share it by mistake
    os.environ[COUNTER_ENV] = _counter.name
    server.log.info("request counter: %s", _counter.name)


def on_exit(server: Any) -> None:
    if _counter is not None:
        server.log.info("requests served: %d", _counter.value)
        _counter.close()
        _counter.unlink()
