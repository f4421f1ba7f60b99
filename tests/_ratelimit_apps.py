"""Apps for ``test_ratelimit_servers``: flask + flask-limiter (served by gunicorn) and
FastAPI + slowapi (served by uvicorn), both limited through ``shm://`` -- the one-line
change the how-to promises.

The test passes ``SAFESHM_TEST_RL_TABLE`` (the table's name), ``SAFESHM_TEST_RL_LIMIT``
(e.g. ``"25/minute"``) and ``SAFESHM_TEST_RL_STRATEGY``. ``/limited`` is limited per
client address; ``/short`` has a 1-second window; ``/pid`` is not limited.
"""

import os
import time
from typing import Any

import safeshm.ratelimit  # noqa: F401 - registers shm://

TABLE = os.environ.get("SAFESHM_TEST_RL_TABLE", "ratelimit-test")
LIMIT = os.environ.get("SAFESHM_TEST_RL_LIMIT", "25/minute")
STRATEGY = os.environ.get("SAFESHM_TEST_RL_STRATEGY", "fixed-window")
BUSY = 0.01  # each request holds its worker this long, so that every worker serves some
STORAGE_URI = f"shm://{TABLE}?keys=1024"

# -- gunicorn settings (read by ``gunicorn -c python:tests._ratelimit_apps``) ---------------
worker_class = "sync"
timeout = 120
graceful_timeout = 30
control_socket_disable = True


def _flask_app() -> Any:
    from flask import Flask
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    app = Flask(__name__)

    @app.after_request
    def tag(response: Any) -> Any:  # every answer, 429s included, says who served it
        response.headers["X-Pid"] = str(os.getpid())
        return response

    @app.before_request
    def busy() -> None:
        time.sleep(BUSY)

    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=STORAGE_URI,
        strategy=STRATEGY,
        in_memory_fallback_enabled=True,  # as the how-to has it
    )

    @app.route("/limited")
    @limiter.limit(LIMIT)
    def limited() -> str:
        return f"{os.getpid()}\n"

    @app.route("/after")
    @limiter.limit(LIMIT)
    def after() -> str:
        return f"{os.getpid()}\n"

    @app.route("/short")
    @limiter.limit("3/second")
    def short() -> str:
        return f"{os.getpid()}\n"

    @app.route("/pid")
    def pid() -> str:
        return f"{os.getpid()}\n"

    return app


def _fastapi_app() -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, storage_uri=STORAGE_URI, strategy=STRATEGY)
    app = FastAPI()

    @app.middleware("http")
    async def tag(request: Request, call_next: Any) -> Any:
        time.sleep(BUSY)  # blocks this worker's loop: the others take new connections
        response = await call_next(request)
        response.headers["X-Pid"] = str(os.getpid())
        return response

    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]

    @app.get("/limited", response_class=PlainTextResponse)
    @limiter.limit(LIMIT)
    def limited(request: Request) -> str:
        return f"{os.getpid()}\n"

    @app.get("/after", response_class=PlainTextResponse)
    @limiter.limit(LIMIT)
    def after(request: Request) -> str:
        return f"{os.getpid()}\n"

    @app.get("/short", response_class=PlainTextResponse)
    @limiter.limit("3/second")
    def short(request: Request) -> str:
        return f"{os.getpid()}\n"

    @app.get("/pid", response_class=PlainTextResponse)
    def pid() -> str:
        return f"{os.getpid()}\n"

    return app


def __getattr__(attr: str) -> Any:
    # Built on first use, in the worker: gunicorn imports this module in its master for the
    # settings above, and uvicorn's workers import it afresh.
    if attr == "flask_app":
        app = globals()["flask_app"] = _flask_app()
        return app
    if attr == "fastapi_app":
        app = globals()["fastapi_app"] = _fastapi_app()
        return app
    raise AttributeError(attr)
