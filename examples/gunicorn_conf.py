"""gunicorn configuration: the master owns the shared request counter.

``on_starting`` runs in the master before any worker is forked: it creates the
counter and puts its name in the environment, which every worker inherits.
``on_exit`` runs in the master when gunicorn shuts down: it removes the counter.
Workers only attach (``gunicorn_app.requests_counter``), so a worker that crashes or
is replaced by gunicorn leaves the counter, and every request it counted, in place.

The master keeps its handle on the arbiter (the ``server`` every hook receives), not
in a global of this module: a reload (``kill -HUP``) executes this file again, which
would reset a global to its initial value, while the arbiter lives as long as the
master.
"""

from __future__ import annotations

import os
from typing import Any

from safeshm import SafeCounter

bind = os.environ.get("MYAPP_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("MYAPP_WORKERS", "4"))

COUNTER_ENV = "MYAPP_REQUESTS_COUNTER"  # the name gunicorn_app.py reads


# `server` is gunicorn's Arbiter (gunicorn ships no type hints).
def on_starting(server: Any) -> None:
    # A random name: two gunicorns on one machine never share it by mistake.
    counter = SafeCounter.create()
    server.requests_counter = counter  # survives a reload, unlike a global here
    os.environ[COUNTER_ENV] = counter.name
    server.log.info("request counter: %s", counter.name)


def on_exit(server: Any) -> None:
    counter: SafeCounter | None = getattr(server, "requests_counter", None)
    if counter is not None:  # None: on_starting failed, and gunicorn exits
        server.log.info("requests served: %d", counter.value)
        counter.close()
        counter.unlink()
