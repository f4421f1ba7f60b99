"""``SafeFileStore.recover`` / ``safeshm store recover`` and the damage ``store check``
names: every record that checks out is kept, every loss is named, the source never
changes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from safeshm import DamagedRecord, RecoveryReport, SafeFileStore, StoreCorruptedError
from safeshm import _store as store_module
from safeshm._cli import main

LOG = store_module.log_name(1)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x41
    path.write_bytes(bytes(data))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _damaged_store(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A store with three damaged records: one whose key was written again later, one
    whose key was not, and a transaction whose header is damaged too. Returns what a
    recovery must give, and where each damaged record starts."""
    starts: dict[str, int] = {}
    with SafeFileStore(path, durable=False) as store:

        def mark(label: str) -> None:
            starts[label] = store.statistics().log_bytes

        store["keep"] = 1
        store["later"] = "old"
        mark("later")
        store["later"] = "lost write"  # damaged below; written again after
        store["gone"] = "before"
        mark("gone")
        store["gone"] = "after"  # damaged below; never written again
        mark("txn")
        with store.transaction() as tx:  # damaged below, header and all
            tx["t1"], tx["t2"] = 1, 2
        store["later"] = "newest"
        store["big"] = "z" * 10_000
        store["tail"] = "last"
    log = path / LOG
    _flip(log, starts["later"] + 25)  # in the value's bytes
    _flip(log, starts["gone"] + 24)  # in the value's bytes
    _flip(log, starts["txn"] + 7)  # in the header
    expected = {"keep": 1, "later": "newest", "gone": "before", "big": "z" * 10_000, "tail": "last"}
    return expected, starts


def test_recover_keeps_what_checks_out_and_names_every_loss(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected, starts = _damaged_store(src)
    with pytest.raises(StoreCorruptedError):
        SafeFileStore(src)
    before = _digest(src)
    report = SafeFileStore.recover(src, dest)
    assert _digest(src) == before  # never changed, not even its lock file
    assert isinstance(report, RecoveryReport)
    assert report.serializer == "json" and report.keys == len(expected)
    assert report.destination == str(dest) and report.torn_tail_bytes == 0
    assert [(d.offset, d.kind, d.keys, d.lost) for d in report.damaged] == [
        (starts["later"], "SET", ("later",), ()),
        (starts["gone"], "SET", ("gone",), ("gone",)),
        (starts["txn"], "unknown", (), ()),
    ]
    assert all(isinstance(d, DamagedRecord) and d.log == LOG for d in report.damaged)
    assert report.lost_keys == ("gone",)
    with SafeFileStore(dest) as recovered:
        assert recovered.to_dict() == expected
    assert store_module.check_store(dest).keys == len(expected)


def test_check_names_the_damage_and_recover_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    expected, starts = _damaged_store(src)
    code, out, _ = _run(capsys, "store", "check", str(src))
    assert code == 1 and out.startswith("CORRUPT:")
    assert f"{LOG} byte {starts['gone']}" in out and "lost this write: 'gone'" in out
    assert f"byte {starts['later']}" in out and "written again later" in out
    assert "keys unknown" in out and "safeshm store recover" in out
    code, out, _ = _run(capsys, "store", "check", "--json", str(src))
    result = json.loads(out)
    assert code == 1 and result["ok"] is False and result["lost_keys"] == ["gone"]
    assert [d["offset"] for d in result["damaged"]] == [starts[k] for k in ("later", "gone", "txn")]
    code, out, _ = _run(capsys, "store", "recover", str(src), str(dest))
    assert code == 3 and "keys that lost a write: 'gone'" in out
    code, out, _ = _run(capsys, "store", "dump", str(dest))
    assert code == 0
    assert {
        json.loads(line)["key"]: json.loads(line)["value"] for line in out.splitlines()
    } == expected
    code, out, err = _run(capsys, "store", "recover", str(src), str(dest))
    assert code == 1 and "new or empty directory" in err  # never overwrites


def test_recover_an_intact_compacted_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    with SafeFileStore(src, serializer="bytes") as store:
        store["a"] = b"1"
        store.compact()
        store["b"] = b"2" * 5000
        del store["a"]
    code, out, _ = _run(capsys, "store", "recover", "--json", str(src), str(dest))
    assert code == 0
    assert json.loads(out)["damaged"] == [] and json.loads(out)["serializer"] == "bytes"
    with SafeFileStore(dest, serializer="bytes") as recovered:
        assert recovered.to_dict() == {"b": b"2" * 5000}


def test_recover_follows_the_log_chain_without_current(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with SafeFileStore(src, durable=False) as store:
        store["a"] = 1
        store.compact()
        store["b"] = 2
    (src / "CURRENT").write_bytes(b"garbage")
    report = SafeFileStore.recover(src, tmp_path / "dest")
    assert report.damaged == () and report.keys == 2
    with SafeFileStore(tmp_path / "dest") as recovered:
        assert recovered.to_dict() == {"a": 1, "b": 2}


def test_a_damaged_header_needs_the_serializer_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with SafeFileStore(src, durable=False, serializer="bytes") as store:
        store["a"] = b"1"
    _flip(src / LOG, 30)  # in the HEADER record's body
    with pytest.raises(StoreCorruptedError, match="serializer"):
        SafeFileStore.recover(src, tmp_path / "d1")
    assert not (tmp_path / "d1").exists()
    report = SafeFileStore.recover(src, tmp_path / "d2", serializer="bytes")
    assert [d.kind for d in report.damaged] == ["HEADER"]
    with SafeFileStore(tmp_path / "d2", serializer="bytes") as recovered:
        assert recovered.to_dict() == {"a": b"1"}


def test_a_torn_tail_is_not_damage(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with SafeFileStore(src, durable=False) as store:
        store["a"] = 1
    os.unlink(src / "write.lock")  # no acknowledged end known: the file decides
    with open(src / LOG, "ab") as f:
        f.write(store_module.encode_record(store_module.SET, b"b", b"2")[:15])
    report = SafeFileStore.recover(src, tmp_path / "dest")
    assert report.damaged == () and report.torn_tail_bytes == 15


def test_bad_destinations(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with SafeFileStore(src, durable=False) as store:
        store["a"] = 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        SafeFileStore.recover(src, tmp_path / "full")
    with pytest.raises(FileExistsError):
        SafeFileStore.recover(src, src)
    with pytest.raises(FileNotFoundError):
        SafeFileStore.recover(tmp_path / "nothing", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
