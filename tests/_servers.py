"""A real server (gunicorn, uvicorn) under test: its own process group, its log in a file,
its workers found in /proc, and a stop that always reaps the whole group."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GUNICORN_LISTENING = r"Listening at: http://127\.0\.0\.1:(\d+)"


class ServerProcess:
    """``cmd`` started in the repository root, in a new session (so a stop can kill
    the workers a stuck master failed to reap), stdout and stderr into ``log_path``."""

    def __init__(
        self, cmd: list[str], log_path: Path, env: dict[str, str], *, timeout: float
    ) -> None:
        self.log_path = log_path
        self.timeout = timeout
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.port = 0
        self._stopped = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, pattern: str = GUNICORN_LISTENING, port: int = 0) -> None:
        """Until the log matches ``pattern``; the port is its first group, or ``port``."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                self.port = port or int(m.group(1))
                return
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        pytest.fail(f"server did not listen within {self.timeout} s:\n{self.log()}")

    def workers(self) -> set[int]:
        """The master's live child processes (its workers), from /proc."""
        children = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            if int(ppid) == self.proc.pid and state != "Z":
                children.add(int(entry))
        return children

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL to the whole process group; always reaps.

        Returns the server's exit status, or None if it had to be killed (or was stopped
        before)."""
        if self._stopped:
            return None
        self._stopped = True
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout)
            returncode = self.proc.poll()
            # Workers the master failed to reap (or all of them, if it was stuck).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            if returncode is None:
                self.proc.wait(timeout=10)
            return returncode
        finally:
            self._log.close()
