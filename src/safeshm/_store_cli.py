"""``safeshm store dump PATH`` and ``safeshm store check PATH``."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import pickle
import sys
from typing import Any

from ._errors import StoreCorruptedError
from ._store import dump_store


def add_store_parser(sub: Any) -> None:
    """Register ``store`` and its subcommands on the CLI's subparsers."""
    store = sub.add_parser("store", help="look into a SafeFileStore directory")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")

    dump = actions.add_parser(
        "dump", help="print the contents as JSON lines: {\"key\": ..., \"value\": ...}")
    dump.add_argument("path")
    dump.add_argument("--unpickle", action="store_true",
                      help="for a pickle store, unpickle values and print their repr() "
                           "(runs code named by the data: only for stores you trust); by "
                           "default their bytes are printed base64-encoded")
    dump.set_defaults(func=cmd_store_dump)

    check = actions.add_parser(
        "check", help="verify every checksum; exit status 1 if the store is corrupt")
    check.add_argument("path")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_store_check)


def _value_fields(serializer: str, data: bytes, unpickle: bool) -> dict[str, Any]:
    if serializer == "json":
        return {"value": json.loads(data)}
    if serializer == "pickle" and unpickle:
        return {"value_repr": repr(pickle.loads(data))}  # noqa: S301 - asked for, documented
    return {"value_base64": base64.b64encode(data).decode("ascii")}


def cmd_store_dump(args: argparse.Namespace) -> int:
    report, pairs = dump_store(args.path)
    for key, data in pairs:
        line = {"key": key, **_value_fields(report.serializer, data, args.unpickle)}
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


def cmd_store_check(args: argparse.Namespace) -> int:
    try:
        report, _ = dump_store(args.path, want_values=False)
    except StoreCorruptedError as e:
        if args.json:
            print(json.dumps({"path": args.path, "ok": False, "error": str(e)}))
        else:
            print(f"CORRUPT: {e}")
        return 1
    if args.json:
        print(json.dumps({"ok": True, **dataclasses.asdict(report)}))
        return 0
    print(f"OK: {report.path}: {report.keys} keys, serializer {report.serializer}, "
          f"generation {report.generation}, log {report.log_bytes} bytes "
          f"({report.live_bytes} live); every checksum matches")
    if report.torn_tail_bytes:
        print(f"note: the log ends in {report.torn_tail_bytes} bytes not acknowledged yet "
              f"(a write in progress, or one whose writer was killed); the next write "
              f"discards a half-written record and makes whole ones visible")
    return 0
