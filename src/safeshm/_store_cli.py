"""``safeshm store dump PATH``, ``safeshm store check PATH`` and
``safeshm store recover SRC DEST``."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import pickle
import sys
from typing import Any

from ._errors import StoreCorruptedError
from ._store import RecoveryReport, dump_store, recover_store, scan_store


def add_store_parser(sub: Any) -> None:
    """Register ``store`` and its subcommands on the CLI's subparsers."""
    store = sub.add_parser("store", help="look into a SafeFileStore directory")
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")

    dump = actions.add_parser(
        "dump", help='print the contents as JSON lines: {"key": ..., "value": ...}'
    )
    dump.add_argument("path")
    dump.add_argument(
        "--unpickle",
        action="store_true",
        help="for a pickle store, unpickle values and print their repr() "
        "(runs code named by the data: only for stores you trust); by "
        "default their bytes are printed base64-encoded",
    )
    dump.set_defaults(func=cmd_store_dump)

    check = actions.add_parser(
        "check", help="verify every checksum; exit status 1 if the store is corrupt"
    )
    check.add_argument("path")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_store_check)

    recover = actions.add_parser(
        "recover",
        help="copy every record that checks out into a new store and say which "
        "keys lost which writes; SRC is never changed. Exit status 0: "
        "nothing lost; 3: recovered, damaged records skipped (listed); 1 or 2: "
        "not recovered (an error)",
    )
    recover.add_argument("source", metavar="SRC")
    recover.add_argument(
        "destination", metavar="DEST", help="a new or empty directory for the recovered store"
    )
    recover.add_argument(
        "--serializer",
        default=None,
        help="the serializer's name (json, bytes, pickle, ...), needed only "
        "when the log's HEADER record is damaged",
    )
    recover.add_argument("--json", action="store_true", help="machine-readable output")
    recover.set_defaults(func=cmd_store_recover)


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


def _damage_lines(report: RecoveryReport) -> list[str]:
    lines = []
    for d in report.damaged:
        keys = (
            ", ".join(repr(k) for k in d.keys) if d.keys else "keys unknown (its header is damaged)"
        )
        lost = (
            f"; lost this write: {', '.join(repr(k) for k in d.lost)}"
            if d.lost
            else "; every key it names was written again later"
            if d.keys
            else ""
        )
        lines.append(
            f"  damaged: {d.log} byte {d.offset} ({d.length} bytes), {d.kind} of {keys}{lost}"
        )
    return lines


def _damage_json(report: RecoveryReport) -> list[dict[str, Any]]:
    return [dataclasses.asdict(d) for d in report.damaged]


def cmd_store_check(args: argparse.Namespace) -> int:
    try:
        report, _ = dump_store(args.path, want_values=False)
    except StoreCorruptedError as e:
        # Name the damaged records and the keys they touch, as far as they can be read.
        try:
            scan: RecoveryReport | None = scan_store(args.path)
        except (StoreCorruptedError, OSError):
            scan = None
        if args.json:
            print(
                json.dumps(
                    {
                        "path": args.path,
                        "ok": False,
                        "error": str(e),
                        "damaged": _damage_json(scan) if scan else None,
                        "lost_keys": list(scan.lost_keys) if scan else None,
                    }
                )
            )
        else:
            print(f"CORRUPT: {e}")
            if scan is not None:
                for line in _damage_lines(scan):
                    print(line)
                print(
                    f"`safeshm store recover {args.path} DEST` copies the "
                    f"{scan.records} records that check out ({scan.keys} keys) into a "
                    f"new store"
                )
        return 1
    if args.json:
        print(json.dumps({"ok": True, **dataclasses.asdict(report)}))
        return 0
    print(
        f"OK: {report.path}: {report.keys} keys, serializer {report.serializer}, "
        f"generation {report.generation}, log {report.log_bytes} bytes "
        f"({report.live_bytes} live); every checksum matches"
    )
    if report.torn_tail_bytes:
        print(
            f"note: the log ends in {report.torn_tail_bytes} bytes not acknowledged yet "
            f"(a write in progress, or one whose writer was killed); the next write "
            f"discards a half-written record and makes whole ones visible"
        )
    return 0


def cmd_store_recover(args: argparse.Namespace) -> int:
    report = recover_store(args.source, args.destination, serializer=args.serializer)
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "lost_keys": list(report.lost_keys)}))
    else:
        print(
            f"recovered {report.keys} keys ({report.records} records that check out) from "
            f"{report.source} into {report.destination}"
        )
        for line in _damage_lines(report):
            print(line)
        if report.torn_tail_bytes:
            print(
                f"  not copied: {report.torn_tail_bytes} bytes at the end that a write "
                f"which never finished leaves"
            )
        if report.damaged:
            print(
                f"{len(report.damaged)} damaged records skipped; keys that lost a write: "
                f"{', '.join(repr(k) for k in report.lost_keys) or 'none that can be read'}"
            )
        else:
            print("no damage found: nothing was lost")
    return 3 if report.damaged else 0
