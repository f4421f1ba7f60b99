"""A loopback TCP proxy in front of a test redis-server that can lose a reply.

``drop_next_reply()`` arms it: the next bytes the server sends back on any connection
are discarded and that connection is closed on both sides. The command was executed;
its client never learns it. That is the failure after which redis-py's automatic retries
(on by default since redis-py 6) would send a non-idempotent command a second time.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class ReplyDroppingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._armed = threading.Event()
        self._refuse = False
        self.dropped = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next_reply(self, *, then_refuse: bool = False) -> None:
        """Lose the next reply; ``then_refuse``: and refuse every connection after it
        (the server looks gone to a retry)."""
        self._refuse = then_refuse
        self._armed.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if replies and self._armed.is_set():
                    self._armed.clear()
                    self.dropped += 1
                    if self._refuse:
                        self._stop_listening()
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _stop_listening(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not, and
        # the kernel would go on accepting connections.
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()

    def close(self) -> None:
        self._stop_listening()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def reply_dropping_proxy(target_port: int) -> Iterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()
