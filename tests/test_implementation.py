"""``safeshm.implementation()``: which implementation a process uses, how it is chosen
(``SAFESHM_NO_EXTENSIONS``, an extension that is missing or does not load), and that
processes of both kinds hand each other handles. The CLI shows it too.

The structures' own mixed-process tests (both kinds on one segment at once) are in
``tests/test_native_*.py``.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _compat
from safeshm._cli import main

from ._helpers import JOIN_TIMEOUT
from ._impls import IMPLEMENTATION, NATIVE_BUILT, env_for, other

# What a process that may use the compiled core gets here.
BEST = "native" if NATIVE_BUILT else "ctypes"


def python(code: str, env: dict[str, str], stdin: bytes = b"") -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (it must exit 0)."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=stdin,
        capture_output=True,
        timeout=JOIN_TIMEOUT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode().strip()


def implementation_with(env: dict[str, str]) -> str:
    return python("import safeshm; print(safeshm.implementation())", env)


def without_variable() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SAFESHM_NO_EXTENSIONS", None)
    return env


# -- the choice --------------------------------------------------------------------------------
def test_this_process() -> None:
    assert safeshm.implementation() in ("native", "ctypes")
    assert safeshm.implementation() == IMPLEMENTATION
    assert (_compat.native is not None) == (IMPLEMENTATION == "native")
    if os.environ.get("SAFESHM_NO_EXTENSIONS"):
        assert IMPLEMENTATION == "ctypes"


def test_default_is_the_compiled_core_where_built() -> None:
    assert implementation_with(without_variable()) == BEST


def test_env_for_gives_each_kind() -> None:
    assert implementation_with(env_for("native")) == BEST
    assert implementation_with(env_for("ctypes")) == "ctypes"


@pytest.mark.parametrize("value", ["1", "0", "yes", "no", "false", " "])
def test_any_non_empty_value_forces_ctypes(value: str) -> None:
    # The convention of aiohttp, yarl, multidict and frozenlist: set = on, whatever it says.
    assert implementation_with({**without_variable(), "SAFESHM_NO_EXTENSIONS": value}) == "ctypes"


def test_an_empty_value_is_not_set() -> None:
    env = {**without_variable(), "SAFESHM_NO_EXTENSIONS": ""}
    assert implementation_with(env) == BEST


def test_chosen_once_at_import() -> None:
    code = (
        "import os, safeshm\n"
        "os.environ['SAFESHM_NO_EXTENSIONS'] = '1'\n"
        "print(safeshm.implementation())"
    )
    assert python(code, without_variable()) == BEST


# -- an extension that cannot be used ----------------------------------------------------------
WORKS = (
    "import safeshm\n"
    "with safeshm.SafeCounter.create() as c:\n"
    "    c.add(41)\n"
    "    assert c.add() == 42\n"
    "lock = safeshm.SafeLock.create()\n"
    "assert lock.acquire(timeout=5)\n"
    "lock.release()\n"
    "lock.close()\n"
    "lock.unlink()\n"
    "print(safeshm.implementation())"
)


def test_an_extension_that_cannot_be_imported_falls_back() -> None:
    # As if the module were missing (a pure install): its import raises ImportError.
    code = "import sys\nsys.modules['safeshm._native'] = None\n" + WORKS
    assert python(code, without_variable()) == "ctypes"


def test_an_extension_that_does_not_load_falls_back(tmp_path: Path) -> None:
    # A broken build (here: not an ELF file) makes the dynamic loader fail.
    package = tmp_path / "safeshm"
    shutil.copytree(
        Path(safeshm.__file__).parent,
        package,
        ignore=shutil.ignore_patterns("__pycache__", "*.so"),
    )
    (package / "_native.abi3.so").write_bytes(b"not a shared object\n" * 10)
    env = {**without_variable(), "PYTHONPATH": str(tmp_path)}
    code = "import safeshm._native"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=JOIN_TIMEOUT,
        env=env,
        check=False,
    )
    assert proc.returncode != 0 and b"ImportError" in proc.stderr  # it really does not load
    where = python("import safeshm; print(safeshm.__file__)", env)
    assert where.startswith(str(tmp_path)), where
    assert python(WORKS, env) == "ctypes"


# -- handles cross implementations -------------------------------------------------------------
def _make(kind: str) -> Any:
    if kind == "counter":
        return safeshm.SafeCounter.create(5)
    if kind == "sharded":
        return safeshm.ShardedCounter.create()
    if kind == "array":
        return safeshm.SafeArray.create("q", 3)
    if kind == "lock":
        return safeshm.SafeLock.create()
    return safeshm.SafeQueue.create(4096)


# Run by the other kind of process on the handle it unpickled; prints what it saw.
_USE: dict[str, str] = {
    "counter": "out = h.add(2)",
    "sharded": "h.add(3); out = h.value",
    "array": "out = h.add(1, 7)",
    "lock": "out = h.acquire(timeout=5); h.release()",
    "queue": "out = h.get(timeout=5); h.put(('back', out))",
}


def _check(kind: str, handle: Any, out: Any) -> None:
    """What this process sees after the other process used the handle."""
    if kind == "counter":
        assert out == 7 and handle.value == 7
    elif kind == "sharded":
        assert out == 3 and handle.value == 3
    elif kind == "array":
        assert out == 7 and handle.to_list() == [0, 7, 0]
    elif kind == "lock":
        assert out is True and handle.acquire(timeout=5)  # released by the other process
        handle.release()
    else:
        assert out == [1, "x"] and handle.get(timeout=5) == ("back", [1, "x"])


@pytest.mark.parametrize("kind", list(_USE))
def test_a_pickled_handle_crosses_implementations(kind: str) -> None:
    """A handle pickled by this process, unpickled by a process of the other kind."""
    handle = _make(kind)  # not `with`: `with lock:` would acquire the lock
    try:
        if kind == "queue":
            handle.put([1, "x"])
        code = (
            "import pickle, sys, safeshm\n"
            "h = pickle.loads(sys.stdin.buffer.read())\n"
            f"{_USE[kind]}\n"
            "print(safeshm.implementation(), type(h).__name__, repr(out))\n"
            "h.close()"
        )
        impl, cls, out = python(code, env_for(other()), pickle.dumps(handle)).split(" ", 2)
        assert impl == (other() if NATIVE_BUILT else "ctypes")
        assert cls == type(handle).__name__
        _check(kind, handle, ast.literal_eval(out))
    finally:
        handle.close()
        handle.unlink()


def test_a_handle_pickled_by_the_other_kind(name: str) -> None:
    """The other way round: the other kind creates and pickles, this process unpickles."""
    code = (
        "import pickle, sys, safeshm\n"
        f"c = safeshm.SafeCounter.create(11, name={name!r})\n"
        "sys.stdout.buffer.write(pickle.dumps(c))\n"
        "c.close()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=JOIN_TIMEOUT,
        env=env_for(other()),
        check=True,
    )
    counter = pickle.loads(proc.stdout)
    try:
        assert counter.add(1) == 12
    finally:
        counter.close()
        counter.unlink()


# -- the command line ------------------------------------------------------------------------
def test_inspect_shows_this_process_implementation(
    capsys: pytest.CaptureFixture[str], cleanup: Any, name: str
) -> None:
    cleanup(safeshm.SafeCounter.create(name=name))
    assert main(["inspect", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["implementation"] == IMPLEMENTATION
    assert main(["inspect", name]) == 0
    assert f"    implementation: {IMPLEMENTATION} (this process's;" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["native", "ctypes"])
def test_version_shows_the_implementation(kind: str) -> None:
    code = "import sys, safeshm._cli\nsys.exit(safeshm._cli.main(['--version']))"
    want = kind if kind == "ctypes" else BEST
    assert python(code, env_for(kind)) == f"safeshm {safeshm.__version__} ({want} implementation)"


def test_demo_shows_the_implementation(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "safeshm", "demo", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
        env={**env_for(other()), "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = other() if NATIVE_BUILT else "ctypes"
    assert f"safeshm implementation: {want} (this process and its workers)" in proc.stdout
