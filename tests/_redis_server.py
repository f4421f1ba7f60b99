"""Real redis-server processes for the tests, on free loopback ports, in temp dirs.

Never the system's server: each :class:`RedisServer` is a child process of the test
session with its own directory, its own port on 127.0.0.1 and the append-only file in
``appendfsync always`` mode, so a ``kill -9`` loses nothing that was acknowledged.
``kill()`` and ``start()`` again (same port, same directory) simulate a crash and a
restart. :func:`start_cluster` makes a 3-master Redis Cluster with ``redis-cli --cluster
create``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["RedisServer", "free_port", "redis_server_binary", "start_cluster"]


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    """A free loopback port at most 55535: a cluster node also listens on port + 10000
    (its bus), and redis-server refuses a port beyond that."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 55535:
            return port
    raise RuntimeError("no free loopback port at or below 55535")


class RedisServer:
    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        cluster: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="safeshm-redis-")
        self.cluster = cluster
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        binary = redis_server_binary()
        assert binary is not None, "redis-server is not installed"
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                log = self.log()
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer within {timeout} s")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(100)
                s.sendall(b"PING\r\n")
                return s.recv(100).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (a crash) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@contextmanager
def started(**kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(**kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def start_cluster(masters: int = 3) -> Iterator[list[RedisServer]]:
    """``masters`` cluster nodes on loopback, slots spread by ``redis-cli --cluster create``."""
    nodes = [RedisServer(cluster=True) for _ in range(masters)]
    try:
        for node in nodes:
            node.start()
        cli = shutil.which("redis-cli")
        assert cli is not None, "redis-cli is not installed"
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        # Wait until every node agrees the cluster is up.
        deadline = time.monotonic() + 30
        for node in nodes:
            while True:
                out = subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True, text=True, timeout=10, check=False,
                ).stdout  # fmt: skip
                if "cluster_state:ok" in out:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not come up: {out}")
                time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def raw_client(url: str) -> Any:
    """A plain redis-py client for ``url`` (its ``#NAME`` ignored), a Cluster client for
    ``?cluster=1``: what the tests use to look at, or spoil, the keys behind a structure."""
    import redis

    base, _, _ = url.partition("#")
    if "cluster=1" in base:
        return redis.RedisCluster.from_url(base.replace("?cluster=1", "").replace("&cluster=1", ""))
    return redis.Redis.from_url(base)
