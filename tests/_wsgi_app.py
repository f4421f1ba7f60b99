"""A tiny WSGI app, and its gunicorn configuration, for ``test_integration_gunicorn``.

Run as ``gunicorn -c python:tests._wsgi_app tests._wsgi_app:application``: gunicorn
imports this module in its master process for the settings and hooks below, and workers
forked from the master serve :func:`application`. The test passes the names of the
segments it created in environment variables:

* ``SAFESHM_TEST_REQUESTS``: a ``SafeCounter`` of every request served;
* ``SAFESHM_TEST_SHARDED``: a ``ShardedCounter`` of the same (its slots of workers that a
  reload replaced must be folded in, never lost);
* ``SAFESHM_TEST_SLOTS``: a ``SafeCounter`` from which each worker claims its index into
* ``SAFESHM_TEST_PER_WORKER``: a ``SafeArray`` of requests served per worker.

``SAFESHM_TEST_ATTACH_IN`` says where handles are attached: ``worker`` (each worker
attaches its own, in ``post_fork``) or ``master`` (the master attaches once, in
``on_starting``, and every worker, including those a reload starts, inherits the handles
through ``fork()``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import safeshm
from safeshm import _compat

# -- gunicorn settings (names gunicorn does not know are ignored) ----------------------------
worker_class = "sync"
# Generous: the test machine may be loaded; a worker is never restarted for being slow.
timeout = 120
graceful_timeout = 60
# Since gunicorn 25.1 the master serves a control socket in $HOME by default: not here.
control_socket_disable = True

_handles: dict[str, Any] = {}
_slot: int | None = None


def _attach() -> None:
    _handles["requests"] = safeshm.SafeCounter.attach(os.environ["SAFESHM_TEST_REQUESTS"])
    _handles["sharded"] = safeshm.ShardedCounter.attach(os.environ["SAFESHM_TEST_SHARDED"])
    _handles["slots"] = safeshm.SafeCounter.attach(os.environ["SAFESHM_TEST_SLOTS"])
    _handles["per_worker"] = safeshm.SafeArray.attach(os.environ["SAFESHM_TEST_PER_WORKER"])


# -- gunicorn hooks ------------------------------------------------------------------------------
def on_starting(server: Any) -> None:
    if os.environ["SAFESHM_TEST_ATTACH_IN"] == "master":
        _attach()


def post_fork(server: Any, worker: Any) -> None:
    global _slot  # noqa: PLW0603 - one slot per worker process
    if os.environ["SAFESHM_TEST_ATTACH_IN"] == "worker":
        _attach()
    _slot = _handles["slots"].add(1) - 1


def worker_exit(server: Any, worker: Any) -> None:
    # In "master" mode these are the worker's inherited copies: closing them must leave
    # the master's handles (and the segments) alone.
    for handle in _handles.values():
        handle.close()


# -- the app ---------------------------------------------------------------------------------
def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/count":
        total = _handles["requests"].add(1)
        _handles["sharded"].add(1)
        mine = _handles["per_worker"].add(_slot, 1)
        body = f"{os.getpid()} {_slot} {total} {mine}".encode()
    elif path == "/info":
        body = json.dumps({"pid": os.getpid(), "slot": _slot, "shm_dir": _compat.SHM_DIR}).encode()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
