"""The victim of ``tests/test_segment_fuzz.py``: damage segments, then use them.

Run in a subprocess (``python -m tests._segment_fuzz SEED SECONDS``) so that a crash -- a
segfault, an abort in the C library -- fails the test instead of killing pytest. For each
trial it builds a segment of one structure with some content, closes it, damages the file
(flipped bytes, random or boundary words, truncation, appended junk), and then attaches
and runs every operation, ``safeshm ls`` and ``safeshm inspect`` on it. Each operation
must give a typed error or a consistent value: a raw or pickling queue returns only items
that were put, a counter an int64, and so on. Anything else prints ``FAIL`` with the
trial's description (seed and trial number replay it) and exits 1.

What is never damaged, and why:

* the bytes of items inside a queue's live records: they are the user's data, stored
  without a checksum (a flipped byte there is a different item, as in any queue);
* the futex word of the internal mutexes (the first 4 bytes of each mutex, except a
  SafeLock's own): a word naming a thread that exists looks exactly like a held lock,
  and the operations that wait on it without a timeout (an array element, a sharded
  counter's first add) would wait. (A word naming a thread that does not exist, in a
  segment nobody else has open, is refused at attach: test_validation.py.) A SafeLock's
  word is damaged: its operations here use timeouts.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import safeshm
from safeshm import _cli, _compat

# Errors that are the right answer to damage (or to what damage did to a value: adding
# to a counter damaged to INT64_MAX overflows).
TYPED: tuple[type[BaseException], ...] = (
    safeshm.SafeShmError,
    queue.Empty,
    queue.Full,
    OverflowError,
)

MUTEX_AT = {
    "counter": [192],
    "sharded": [192],
    "array": [192, 320],
    "queue": [256],
    "rawqueue": [256],
}
RING = 384
INT64 = (-(2**63), 2**63 - 1)
BOUNDARY_WORDS = [0, 1, -1, 7, 8, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63), 4096]


class Failure(Exception):
    """An outcome that is neither a typed error nor a consistent value."""


def _path(name: str) -> str:
    return os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)


# -- building each structure, and the bytes that may be damaged ------------------------------
def build(kind: str, name: str, rng: random.Random) -> tuple[set[Any], list[range]]:
    """Create ``name`` with content; return the queue items it holds (if a queue) and
    the byte ranges that must not be damaged (see the module docstring)."""
    items: set[Any] = set()
    keep: list[range] = [range(m, m + 4) for m in MUTEX_AT.get(kind, [])]
    if kind == "counter":
        h: Any = safeshm.SafeCounter.create(rng.randrange(-1000, 1000), name=name)
    elif kind == "sharded":
        h = safeshm.ShardedCounter.create(5, name=name, slots=4)
        h.add(3)
    elif kind == "lock":
        h = safeshm.SafeLock.create(name=name)
    elif kind == "array":
        h = safeshm.SafeArray.create("q", list(range(20)), name=name, stripes=2)
    else:
        raw = kind == "rawqueue"
        h = safeshm.SafeQueue.create(512, name=name, raw=raw)
        # Some taken, some left, so that the live records wrap around the ring. What a get
        # may return after damage is any item ever put: a damaged position word (they carry
        # no checksum, see docs/design.md "Known limits") that still lands on a record
        # boundary replays a record already taken -- a real item, never garbage.
        ever: set[Any] = set()
        for i in range(rng.randrange(1, 12)):
            item: Any = os.urandom(rng.randrange(0, 60)) if raw else ("item", i, "x" * i)
            try:
                h.put(item, block=False)
            except queue.Full:
                break
            ever.add(item)
            if rng.random() < 0.4:
                h.get_nowait()
        while True:
            try:
                item = os.urandom(rng.randrange(0, 60)) if raw else ("late", rng.random())
                h.put(item, block=False)
            except queue.Full:
                break
            ever.add(item)
            if rng.random() < 0.3:
                break
        left = h.get_many(1000, block=False) if not h.empty() else []
        h.put_many(left)
        items = ever
        keep += _live_payloads(name)
    h.close()
    return items, keep


def _live_payloads(name: str) -> list[range]:
    """The byte ranges of the payloads of a queue's live records."""
    with open(_path(name), "rb") as f:
        raw = f.read()
    capacity = struct.unpack_from("=Q", raw, 64)[0]
    head, tail = struct.unpack_from("=qq", raw, 128)
    out = []
    at = head
    while at != tail:
        n = struct.unpack_from("=Q", raw, RING + at % capacity)[0] & 0xFFFFFFFF
        start = (at + 8) % capacity
        for k in range(n):  # a payload may wrap around the end of the ring
            pos = RING + (start + k) % capacity
            out.append(range(pos, pos + 1))
        at += (n + 15) & ~7
    return out


def damage(name: str, keep: list[range], rng: random.Random) -> str:
    """Damage the segment file in place; return what was done."""
    with open(_path(name), "rb") as f:
        data = bytearray(f.read())
    kept = {b for r in keep for b in r}
    allowed = [i for i in range(len(data)) if i not in kept]
    how = rng.choice(["flip", "flip", "flip", "word", "word", "truncate", "append", "zero"])
    if how == "flip":
        done = []
        for _ in range(rng.choice([1, 1, 2, 4])):
            i = rng.choice(allowed)
            data[i] ^= 1 << rng.randrange(8) if rng.random() < 0.6 else rng.randrange(1, 256)
            done.append(i)
        what = f"bytes changed at {sorted(done)}"
    elif how == "word":
        i = (
            rng.choice(
                [
                    i
                    for i in allowed
                    if i % 8 == 0 and all(j in allowed for j in range(i, min(i + 8, len(data))))
                ]
                or [0]
            )
            & ~7
        )
        value = rng.choice(BOUNDARY_WORDS) if rng.random() < 0.7 else rng.randrange(-(2**63), 2**63)
        struct.pack_into("=q", data, i, value)
        what = f"word at {i} set to {value}"
    elif how == "truncate":
        n = rng.randrange(0, len(data))
        del data[n:]
        what = f"truncated to {n} bytes"
    elif how == "append":
        n = rng.randrange(1, 300)
        data += os.urandom(n)
        what = f"{n} bytes of junk appended"
    else:
        i = rng.choice(allowed)
        n = rng.randrange(1, 64)
        for j in range(i, min(i + n, len(data))):
            if j in allowed:
                data[j] = 0
        what = f"up to {n} bytes zeroed from {i}"
    fd = os.open(_path(name), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, bytes(data))
    finally:
        os.close(fd)
    return what


# -- using it ----------------------------------------------------------------------------------
def attempt(op: Callable[[], Any]) -> Any:
    """Run ``op``: its value, or ``None`` after a typed error."""
    try:
        return op()
    except TYPED:
        return None


def check_int64(v: Any, what: str) -> None:
    if v is not None and not (type(v) is int and INT64[0] <= v <= INT64[1]):
        raise Failure(f"{what} returned {v!r}")


def use(kind: str, name: str, items: set[Any]) -> None:
    cls: Any = {
        "counter": safeshm.SafeCounter,
        "sharded": safeshm.ShardedCounter,
        "lock": safeshm.SafeLock,
        "array": safeshm.SafeArray,
    }.get(kind, safeshm.SafeQueue)
    h = attempt(lambda: cls.attach(name))
    if h is None:
        return
    try:
        repr(h)
        if kind == "counter":
            check_int64(attempt(lambda: h.value), "value")
            check_int64(attempt(lambda: h.add(1)), "add")
            check_int64(attempt(lambda: h.exchange(5)), "exchange")
            attempt(lambda: h.compare_and_set(5, 6))
            if attempt(lambda: h.value) not in (None, 6):
                raise Failure("the counter lost a set")
        elif kind == "sharded":
            value = attempt(lambda: h.value)
            if value is not None and type(value) is not int:
                raise Failure(f"value returned {value!r}")
            attempt(lambda: h.add(1))
            attempt(lambda: h.exchange(0))
            attempt(h.statistics)
        elif kind == "lock":
            got = attempt(lambda: h.acquire(timeout=0.05))
            if got:
                h.release()
            attempt(h.locked)
            attempt(h.statistics)
        elif kind == "array":
            for v in attempt(h.to_list) or []:
                check_int64(v, "to_list")
            check_int64(attempt(lambda: h[0]), "a[0]")
            attempt(lambda: h.__setitem__(1, 7))
            check_int64(attempt(lambda: h.add(2, 1)), "add")
            attempt(lambda: h.fill(3))

            def bulk() -> None:
                with h.locked() as view:
                    view[0] = 9

            attempt(bulk)
            attempt(h.statistics)
        else:
            use_queue(h, items)
    finally:
        h.close()


def use_queue(q: Any, items: set[Any]) -> None:
    attempt(q.qsize)
    attempt(q.statistics)
    for _ in range(40):
        try:
            got = q.get(timeout=0.01)
        except TYPED:
            break
        if got not in items:
            raise Failure(f"get returned an item that was never put: {got!r}")
    for got in attempt(lambda: q.get_many(100, timeout=0.01)) or []:
        if got not in items:
            raise Failure(f"get_many returned an item that was never put: {got!r}")
    item = b"new" if q.raw else ("new",)
    if attempt(lambda: q.put(item, timeout=0.01)) is None and not q.full():
        pass  # a typed refusal (damage, shutdown, Full): fine
    items.add(item)
    for got in attempt(lambda: q.get_many(100, timeout=0.01)) or []:
        if got not in items:
            raise Failure(f"get_many returned an item that was never put: {got!r}")


def cli(name: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        for argv in (["ls"], ["ls", "--json"], ["inspect", name], ["inspect", "--json", name]):
            code = _cli.main(argv)
            if code not in (0, 1):
                raise Failure(f"safeshm {' '.join(argv)} exited {code}: {out.getvalue()}")


KINDS = ["counter", "sharded", "lock", "array", "queue", "rawqueue"]


def main(seed: int, seconds: float) -> int:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    trials = 0
    counts = dict.fromkeys(KINDS, 0)
    while time.monotonic() < deadline:
        kind = KINDS[trials % len(KINDS)]
        name = f"fuzz{os.getpid()}-{trials}"
        items, keep = build(kind, name, rng)
        what = damage(name, keep, rng)
        line = f"seed {seed} trial {trials}: {kind}, {what}"
        print(line, flush=True)
        try:
            use(kind, name, items)
            cli(name)
        except Failure as e:
            print(f"FAIL {line}: {e}", flush=True)
            return 1
        except BaseException:  # noqa: BLE001 - anything untyped is the failure reported
            print(f"FAIL {line}: untyped error\n{traceback.format_exc()}", flush=True)
            return 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_path(name))
        counts[kind] += 1
        trials += 1
    print(f"OK {trials} trials: {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2])))
