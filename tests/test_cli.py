"""``python -m safeshm``: ls, inspect, rm, demo, and error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _compat
from safeshm._cli import main

from ._helpers import JOIN_TIMEOUT


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "safeshm", *args], capture_output=True,
                          text=True, timeout=JOIN_TIMEOUT * 2, check=False)


def test_demo_runs_and_checks(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "safeshm", "demo", "--workers", "2"],
                          capture_output=True, text=True, timeout=JOIN_TIMEOUT * 2,
                          check=False, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    # 4 totals, 3 store checks, and the queue after each start method.
    assert proc.stdout.count("[ok]") == 9
    assert "FAIL" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the store's directory is gone too


def test_console_script_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "safeshm"]
    assert ep.value == "safeshm._cli:main"


def test_ls_lists_our_segments(capsys: pytest.CaptureFixture[str], cleanup: Any,
                               name: str) -> None:
    c = cleanup(safeshm.SafeCounter.create(42, name=name))
    s = cleanup(safeshm.ShardedCounter.create(7))
    lock = cleanup(safeshm.SafeLock.create())
    arr = cleanup(safeshm.SafeArray.create("d", 3))
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "SafeCounter" in lines[name] and "value=42" in lines[name]
    assert "ShardedCounter" in lines[s.name] and "value=7" in lines[s.name]
    assert "SafeLock" in lines[lock.name] and "locked=False" in lines[lock.name]
    assert "SafeArray" in lines[arr.name] and "typecode=d length=3" in lines[arr.name]
    assert f"{os.getpid()} (alive)" in lines[name]
    assert c.value == 42  # listing disturbed nothing


def test_ls_json(capsys: pytest.CaptureFixture[str], cleanup: Any, name: str) -> None:
    cleanup(safeshm.SafeCounter.create(5, name=name))
    assert main(["ls", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    e = entries[name]
    assert e["kind"] == "SafeCounter (layout 1)"
    assert e["stats"]["value"] == 5
    assert e["in_use"] is True
    assert e["creator_pid"] == os.getpid()


def test_ls_leaves_foreign_files_alone(capsys: pytest.CaptureFixture[str]) -> None:
    foreign = os.path.join(_compat.SHM_DIR, "not-ours-" + str(os.getpid()))
    with open(foreign, "wb") as f:
        f.write(b"x" * 100)
    try:
        assert main(["ls"]) == 0
        assert os.path.basename(foreign) not in capsys.readouterr().out
        assert main(["rm", "--yes", "--stale"]) == 0
        assert os.path.exists(foreign)
    finally:
        os.unlink(foreign)


def test_inspect(capsys: pytest.CaptureFixture[str], cleanup: Any, name: str) -> None:
    cleanup(safeshm.SafeCounter.create(9, name=name))
    assert main(["inspect", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == name
    assert info["statistics"]["value"] == 9
    assert info["statistics"]["implementation"]
    assert main(["inspect", name]) == 0
    assert "value: 9" in capsys.readouterr().out


def test_inspect_missing(capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert main(["inspect", name]) == 1
    assert "no segment" in capsys.readouterr().err


def test_rm(capsys: pytest.CaptureFixture[str], name: str) -> None:
    c = safeshm.SafeCounter.create(name=name)
    c.close()
    assert main(["rm", "--yes", name]) == 0
    assert not os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name))
    assert main(["rm", "--yes", name]) == 1


def test_rm_asks_for_confirmation(monkeypatch: pytest.MonkeyPatch, cleanup: Any,
                                  name: str) -> None:
    cleanup(safeshm.SafeCounter.create(name=name))
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["rm", name]) == 0
    assert os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name))


def test_rm_refuses_non_safeshm_file(capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)
    with open(path, "wb") as f:
        f.write(b"\0" * 256)
    try:
        assert main(["rm", "--yes", name]) == 1
        assert os.path.exists(path)
        assert "not a safeshm segment" in capsys.readouterr().err
    finally:
        os.unlink(path)


def test_rm_stale_removes_only_unused(cleanup: Any, unique: Any) -> None:
    used = cleanup(safeshm.SafeCounter.create(name=unique()))
    stale = safeshm.SafeCounter.create(name=unique())
    stale.close()  # nobody has it open any more
    assert main(["rm", "--yes", "--stale"]) == 0
    assert os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + used.name))
    assert not os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + stale.name))
    assert used.add(1) == 1


@pytest.mark.parametrize("argv", [[], ["nope"], ["inspect"], ["demo", "--workers", "0"],
                                  ["demo", "--workers", "x"], ["inspect", "bad/name"],
                                  ["rm", "--yes", "../etc"]])
def test_bad_arguments_exit_nonzero_without_traceback(argv: list[str]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip()
