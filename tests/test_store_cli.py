"""``safeshm store dump`` and ``safeshm store check``."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest

from safeshm import SafeFileStore
from safeshm import _store as store_module
from safeshm._cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dump_json_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with SafeFileStore(tmp_path / "j", durable=False) as s:
        s.update({"a": {"x": [1, None]}, "é": "ü"})
        del s["a"]
        s["b"] = 2
    code, out, err = _run(capsys, "store", "dump", str(tmp_path / "j"))
    assert code == 0 and err == ""
    assert [json.loads(line) for line in out.splitlines()] == [
        {"key": "é", "value": "ü"},
        {"key": "b", "value": 2},
    ]


def test_dump_bytes_and_pickle_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with SafeFileStore(tmp_path / "b", serializer="bytes", durable=False) as s:
        s["k"] = b"\x00\xff"
    code, out, _ = _run(capsys, "store", "dump", str(tmp_path / "b"))
    assert code == 0
    assert base64.b64decode(json.loads(out)["value_base64"]) == b"\x00\xff"
    with SafeFileStore(tmp_path / "p", serializer="pickle", durable=False) as s:
        s["k"] = {1, 2}
    code, out, _ = _run(capsys, "store", "dump", str(tmp_path / "p"))
    # Never unpickled unless asked: the bytes come out as they are.
    assert code == 0
    assert pickle.loads(base64.b64decode(json.loads(out)["value_base64"])) == {1, 2}
    code, out, _ = _run(capsys, "store", "dump", "--unpickle", str(tmp_path / "p"))
    assert code == 0 and json.loads(out) == {"key": "k", "value_repr": "{1, 2}"}


def test_check_ok_torn_and_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    with SafeFileStore(path, durable=False) as s:
        s["a"] = 1
    code, out, _ = _run(capsys, "store", "check", str(path))
    assert code == 0 and out.startswith("OK:") and "1 keys" in out
    log = path / store_module.log_name(1)
    with open(log, "ab") as f:
        f.write(store_module.encode_record(store_module.SET, b"b", b"2")[:10])
    code, out, _ = _run(capsys, "store", "check", str(path))
    assert code == 0 and "10 bytes" in out and "discards a half-written record" in out
    code, out, _ = _run(capsys, "store", "check", "--json", str(path))
    assert code == 0 and json.loads(out)["torn_tail_bytes"] == 10
    with open(log, "ab") as f:
        f.write(b"\x07" * 64)
    code, out, _ = _run(capsys, "store", "check", str(path))
    assert code == 1 and out.startswith("CORRUPT:") and "corrupt at byte" in out
    code, out, _ = _run(capsys, "store", "check", "--json", str(path))
    assert code == 1 and json.loads(out)["ok"] is False
    code, out, err = _run(capsys, "store", "dump", str(path))
    assert code == 2 and out == "" and "corrupt at byte" in err
    # check never repairs: the damage is still there for the user to look at.
    assert log.stat().st_size > 64


@pytest.mark.parametrize(
    "argv",
    [
        ["store", "check", "/nonexistent/store"],
        ["store", "dump", "/nonexistent/store"],
    ],
)
def test_missing_store(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 1 and out == "" and "no SafeFileStore" in err
    assert "Traceback" not in err


def test_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    code, _, err = _run(capsys, "store", "check", str(tmp_path / "f"))
    assert code == 1 and "not a directory" in err.lower()
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    code, _, err = _run(capsys, "store", "check", str(empty))
    assert code == 1 and "no SafeFileStore" in err
    assert list(empty.iterdir()) == []  # looking never creates anything


@pytest.mark.parametrize("argv", [["store"], ["store", "dump"], ["store", "frob", "x"]])
def test_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err
