"""Two hosts' worth of real gunicorn servers sharing counters through a real Redis.

``examples/fleet_app.py`` served by two gunicorn masters with 2 workers each, every
master with its own ``SAFESHM_DIR`` (its own "host": its own shared memory) and host id,
both pointed at one test redis-server by URL. Requests over real HTTP on 127.0.0.1,
spread over both: the request numbers are exactly 1..N (one exact counter for the
fleet), and the hit counter, counted locally per host and published by each host, adds
up to N within a flush interval.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("gunicorn")

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 120
FLUSH = 0.2


class Host:
    """A gunicorn master serving fleet_app with its own shared-memory directory."""

    def __init__(self, index: int, env: dict[str, str], tmp: Path) -> None:
        self.shm_dir = tempfile.mkdtemp(prefix=f"safeshm-host{index}-", dir="/dev/shm")
        os.chmod(self.shm_dir, 0o700)
        self.log = tmp / f"host{index}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", "127.0.0.1:0",
             "--chdir", str(ROOT / "examples"), "fleet_app:app"],
            env={**env, "SAFESHM_DIR": self.shm_dir, "MYAPP_HOST_ID": f"host{index}",
                 "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])},
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(rb"Listening at: http://127\.0\.0\.1:(\d+)", self.log.read_bytes())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"gunicorn did not start: {self.log.read_text()[-3000:]}")

    def get(self, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
            return int(reply.read())
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.shm_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_two_hosts_share_counters_through_redis(
    redis_url: Callable[[str], str], tmp_path: Path
) -> None:
    requests_url, hits_url = redis_url("myapp.requests"), redis_url("myapp.hits")
    env = {
        **os.environ,
        "MYAPP_REQUESTS_URL": requests_url,
        "MYAPP_HITS_URL": hits_url,
        "MYAPP_FLUSH": str(FLUSH),
    }
    hosts: list[Host] = []
    try:
        hosts = [Host(i, env, tmp_path) for i in range(2)]
        numbers = [hosts[i % 2].get("/") for i in range(REQUESTS)]
        assert sorted(numbers) == list(range(1, REQUESTS + 1))  # one exact fleet counter
        deadline = time.monotonic() + 30
        while any(h.get("/hits") != REQUESTS for h in hosts):
            assert time.monotonic() < deadline, [h.get("/hits") for h in hosts]
            time.sleep(FLUSH / 2)
        # Each host published its own share, and the shares add up.
        import safeshm
        from safeshm.redis import FleetCounter

        with FleetCounter.open(hits_url, flush_interval=None, host_id="reader",
                               local_name=f"reader-{os.getpid()}") as reader:  # fmt: skip
            shares = reader.hosts()
            assert sum(v for k, v in shares.items() if k.startswith("host")) == REQUESTS
            assert {k.split("/")[0] for k in shares} >= {"host0", "host1"}
            reader.unlink()
        with safeshm.open_counter(requests_url) as c:  # type: ignore[attr-defined]
            assert c.value == REQUESTS
            c.unlink()
    finally:
        for h in hosts:
            h.stop()
