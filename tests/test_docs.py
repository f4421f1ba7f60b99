"""Every code example in the docs runs.

* Each fenced ``python`` block of ``README.md`` and ``docs/**/*.md`` is run as a script
  of its own, in a fresh interpreter, in an empty temporary directory, with the test
  session's ``SAFESHM_DIR``, every warning an error, and a timeout. A block that is
  deliberately not runnable (a fragment) says so on the line before its fence:
  ``<!-- no-test: why -->``. A block made only of snippet includes
  (``--8<-- "file.py"``, how the how-to pages show ``examples/``) is checked to include
  an example that ``test_example`` runs.
* Each ``examples/*.py`` is run as a script (its ``main()``), the same way; the gunicorn
  example is also served by a real gunicorn when gunicorn is installed, reloaded with
  ``SIGHUP`` and stopped with ``SIGTERM``.

The autouse leak check of ``conftest.py`` fails a test whose example leaves a segment
behind. ``test_blocks_found`` guards against a parser mistake that would skip everything.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import safeshm
from safeshm import _compat

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TIMEOUT = 60.0

# Fewer runnable blocks than this means the parser (or a careless no-test marker) is
# skipping examples; raise it as the docs grow.
MIN_RUNNABLE_BLOCKS = 19

# Examples without a main(), and why.
NOT_SCRIPTS = {"gunicorn_conf.py": "a gunicorn config file, served by test_gunicorn"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_NO_TEST = re.compile(r"^\s*<!--\s*no-test:\s*(?P<reason>\S.*?)\s*-->\s*$")
_SNIPPET = re.compile(r"""^\s*-{1,}8<-{1,}\s+["'](?P<file>[^"':]+)(?::[^"']*)?["']\s*$""")
_PYTHON = {"python", "py", "python3"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    no_test: str | None  # the reason given in a no-test marker

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def includes(self) -> list[str]:
        """The files a block made only of snippet includes includes, else []."""
        lines = [line for line in self.code.splitlines() if line.strip()]
        matches = [_SNIPPET.match(line) for line in lines]
        if lines and all(matches):
            return [m["file"] for m in matches if m]
        return []


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def python_blocks(path: Path) -> list[Block]:
    """The fenced Python blocks of a markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not _closes(lines[i], fence):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1  # the closing fence
        language = info.split()[0].lstrip(".").lower() if info else ""
        if language not in _PYTHON:
            continue
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _NO_TEST.match(previous)
        blocks.append(
            Block(path, start + 1, "\n".join(body) + "\n", marker["reason"] if marker else None)
        )
    return blocks


BLOCKS = [block for path in MARKDOWN for block in python_blocks(path)]
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if p.name not in NOT_SCRIPTS)


def run_script(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a script the way a user would, in ``cwd``; fail the test if it fails."""
    try:
        result = subprocess.run(
            [sys.executable, "-W", "error", str(script)],
            cwd=cwd,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:  # run() has killed it
        pytest.fail(f"{script.name} did not finish within {TIMEOUT} s\n{e.stdout}\n{e.stderr}")
    if result.returncode != 0:
        pytest.fail(
            f"{script.name} exited {result.returncode}\n--- stdout\n{result.stdout}"
            f"\n--- stderr\n{result.stderr}"
        )
    return result


# -- markdown -------------------------------------------------------------------------------


def test_blocks_found() -> None:
    runnable = [b for b in BLOCKS if b.no_test is None and not b.includes]
    included = {name for b in BLOCKS for name in b.includes}
    assert len(runnable) >= MIN_RUNNABLE_BLOCKS, [b.id for b in runnable]
    # Every how-to example is shown in the docs, and the docs show nothing else from there.
    assert included == {p.name for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=b.id) for b in BLOCKS if b.no_test is None and not b.includes]
)
def test_block(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    run_script(script, tmp_path)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if b.includes])
def test_included_examples_exist(block: Block) -> None:
    for name in block.includes:
        assert (EXAMPLES / name).is_file(), f"{block.id} includes a missing {name}"


def test_reference_covers_the_public_api() -> None:
    """Every name in ``safeshm.__all__`` has its entry in the API reference."""
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: safeshm\.(\w+)\s*$", text, re.MULTILINE))
    assert documented == set(safeshm.__all__) - {"__version__"}


# -- examples -------------------------------------------------------------------------------


def test_examples_are_scripts() -> None:
    """Every example but the listed ones has a main() run under ``__main__``."""
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        is_script = "\ndef main(" in text and '\nif __name__ == "__main__":' in text
        assert is_script == (path.name not in NOT_SCRIPTS), path.name
    assert set(NOT_SCRIPTS) <= {p.name for p in EXAMPLES.glob("*.py")}


@pytest.mark.parametrize("script", [pytest.param(p, id=p.name) for p in SCRIPTS])
def test_example(script: Path, tmp_path: Path) -> None:
    run_script(script, tmp_path)


def _segments() -> set[str]:
    return {f for f in os.listdir(_compat.SHM_DIR) if f.startswith(_compat.FILE_PREFIX)}


def test_gunicorn(tmp_path: Path) -> None:
    """The how-to's command line, with two workers: every request gets a number once,
    also across a reload (SIGHUP), which re-executes ``gunicorn_conf.py`` and replaces
    every worker; on SIGTERM the master logs the total and removes the counter."""
    pytest.importorskip("gunicorn")
    from gunicorn.config import Config

    options = []
    if "control_socket_disable" in Config().settings:  # gunicorn 24+: no ~/.gunicorn socket
        options.append("--no-control-socket")
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "MYAPP_BIND": "127.0.0.1:0",
        "MYAPP_WORKERS": "2",
        "PYTHONDONTWRITEBYTECODE": "1",
    }  # leave no __pycache__ in examples/
    before = _segments()
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn_conf.py",
                *options,
                "gunicorn_app:app",
            ],
            cwd=EXAMPLES,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def wait_for(
        what: str, found: Callable[[str], re.Match[str] | bool | None]
    ) -> re.Match[str] | bool:
        deadline = time.monotonic() + TIMEOUT
        while not (result := found(text := log.read_text())):
            assert server.poll() is None, f"gunicorn exited before {what}:\n{text}"
            assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s:\n{text}"
            time.sleep(0.05)
        return result

    def booted(text: str) -> list[int]:
        return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", text)]

    try:
        listening = wait_for("listening", lambda t: re.search(r"Listening at: (http://\S+)", t))
        assert isinstance(listening, re.Match)
        url = listening[1] + "/"
        counter = re.findall(r"request counter: (\S+)", log.read_text())
        assert len(counter) == 1
        path = os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + counter[0])
        assert os.path.exists(path)

        def get(_: int) -> tuple[int, int]:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - http to ourselves
                body = response.read().decode()
            m = re.fullmatch(r"request #(\d+), served by worker (\d+)\n", body)
            assert m is not None, body
            return int(m[1]), int(m[2])

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(get, range(40)))
        wait_for("two workers", lambda t: len(booted(t)) == 2)
        first = set(booted(log.read_text()))
        assert {pid for _, pid in replies} <= first

        # A reload: gunicorn re-executes gunicorn_conf.py (its module-level state starts
        # again from scratch), boots two new workers and stops the old ones.
        server.send_signal(signal.SIGHUP)
        wait_for(
            "reload",
            lambda t: (
                "Hang up: Master" in t
                and len(booted(t)) == 4
                and all(f"Worker exiting (pid: {pid})" in t for pid in first)
            ),
        )
        with ThreadPoolExecutor(4) as pool:
            after = list(pool.map(get, range(40)))
        assert not {pid for _, pid in after} & first  # the new workers served them
        replies += after
        assert sorted(number for number, _ in replies) == list(range(1, 81)), replies
        assert os.path.exists(path)

        server.send_signal(signal.SIGTERM)  # on_exit reports the count and unlinks it
        assert server.wait(timeout=TIMEOUT) == 0, log.read_text()
        text = log.read_text()
        assert "requests served: 80" in text, text
        assert "Traceback" not in text, text
        assert not os.path.exists(path)
        assert _segments() == before
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=TIMEOUT)
