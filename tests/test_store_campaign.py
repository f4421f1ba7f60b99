"""The adversarial campaign of issue 10, bounded, for SafeFileStore: random damage to every
file of a store (a typed error or a committed state, never garbage, never a crash), and
writers SIGKILLed at random instants hundreds of times with exact accounting of every
acknowledged write."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from safeshm import IncompatibleStoreError, SafeFileStore, StoreCorruptedError
from safeshm import _store as store_module

from ._helpers import JOIN_TIMEOUT
from ._store_helpers import apply_step, run_step

SCRIPT: list[tuple[str, Any]] = [
    ("set", ("a", 1)),
    ("set", ("b", {"nested": ["x", 2.5]})),
    ("txn", [("set", "c", "three"), ("del", "a", None), ("set", "b", 22)]),
    ("set", ("big", "B" * 6000)),  # read from the file, not the index
    ("modify", "n"),
    ("compact", None),
    ("del", "c"),
    ("set", ("a", "again")),
    ("txn", [("set", "big", "b" * 5000), ("set", "e", None)]),
    ("modify", "n"),
    ("set", ("last", "L" * 40)),
]
TYPED = (StoreCorruptedError, IncompatibleStoreError)


def _build(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = {}
    with SafeFileStore(path, durable=False) as store:
        for op, arg in SCRIPT:
            run_step(store, op, arg)
            state = apply_step(state, op, arg)
    return state


def _boundaries(log: Path) -> list[int]:
    data = log.read_bytes()
    ends, pos = [], 0
    while pos < len(data):
        length = store_module._record_length(data, pos)
        assert length, pos
        pos += length
        ends.append(pos)
    return ends


def _prefix_states(pristine: Path, scratch: Path) -> list[dict[str, Any]]:
    """Every state the store's log shows when it is cut at a record boundary: what a
    reader that cannot trust the acknowledged end (a copy, a reboot) may take for
    committed."""
    (log,) = pristine.glob("data.*.log")
    states = []
    for end in _boundaries(log):
        shutil.copytree(pristine, scratch)
        os.truncate(scratch / log.name, end)
        with SafeFileStore(scratch, durable=False) as store:
            states.append(store.to_dict())
        shutil.rmtree(scratch)
    return states


def _mutate(rng: random.Random, path: Path) -> tuple[str, str]:
    name = rng.choice(sorted(os.listdir(path)))
    target = path / name
    data = bytearray(target.read_bytes())
    how = rng.choice(["flip", "flips", "truncate", "junk", "zeros", "zero-tail"])
    # Half of the damage lands in the last record, where damage and a torn write are
    # hardest to tell apart.
    lowest = 0
    if rng.random() < 0.5:
        lowest = _boundaries(target)[-2] if name.startswith("data.") else len(data) // 2
    if how == "zero-tail" and data:  # what a lost write looks like after a power loss
        cut = rng.randrange(lowest, len(data))
        data[cut:] = bytes(len(data) - cut)
    elif how in ("flip", "flips") and data:
        for _ in range(1 if how == "flip" else rng.randint(2, 8)):
            data[rng.randrange(lowest, len(data))] ^= rng.randint(1, 255)
    elif how == "truncate" and data:
        cut = rng.randrange(lowest, len(data))
        if name.startswith("data.") and rng.random() < 0.5:  # at a record boundary
            cut = rng.choice(_boundaries(target)[:-1])
        del data[cut:]
    elif how == "junk":
        data += rng.randbytes(rng.randint(1, 300))
    else:
        data += bytes(rng.randint(1, 300))
    with open(target, "r+b") as f:  # in place: the same inode, so the hints stay trusted
        f.write(data)
        f.truncate(len(data))
    return name, how


@pytest.mark.slow
def test_fuzzed_stores_give_a_typed_error_or_a_committed_state(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    final = _build(pristine)
    allowed = _prefix_states(pristine, tmp_path / "scratch")
    assert allowed[-1] == final
    every_value = {(k, repr(v)) for state in allowed for k, v in state.items()}
    every_value.add(("probe", "1"))
    rng = random.Random(20261203)
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + 30
    trials = 0
    while trials < 600 and time.monotonic() < deadline:
        trials += 1
        path = tmp_path / f"t{trials}"
        _build(path)  # built in place each time: its lock file's hints are trusted
        trusted = rng.random() < 0.7
        if not trusted:
            os.unlink(path / "write.lock")  # as after a reboot: the file alone decides
        name, how = _mutate(rng, path)
        where = f"trial {trials}: {how} of {name}, hints {'trusted' if trusted else 'not'}"
        try:
            with SafeFileStore(path, durable=False) as store:
                got: dict[str, Any] | None = store.to_dict()
        except TYPED:
            got = None
        if got is None:
            outcomes["typed error"] = outcomes.get("typed error", 0) + 1
        else:
            outcomes["opened"] = outcomes.get("opened", 0) + 1
            assert got in allowed, where
            if trusted and name.startswith("data.") and how not in ("junk", "zeros"):
                # Inside what was acknowledged: damage, never taken for a torn write.
                raise AssertionError(f"{where}: damage opened silently")
            if name == "write.lock":
                assert got == final, where  # only hints: never changes what is seen
            # The next write either reports the damage or lands after a committed state.
            try:
                with SafeFileStore(path, durable=False) as store:
                    store["probe"] = 1
            except TYPED:
                pass
            else:
                with SafeFileStore(path, durable=False) as again:
                    assert again.to_dict() == {**got, "probe": 1}, where
        # Recovery never crashes and never invents a value.
        try:
            report = SafeFileStore.recover(path, tmp_path / f"r{trials}")
        except TYPED:
            continue
        except FileNotFoundError:
            continue
        with SafeFileStore(tmp_path / f"r{trials}", durable=False) as recovered:
            values = recovered.to_dict()
        assert {(k, repr(v)) for k, v in values.items()} <= every_value, where
        assert report.keys == len(values), where
        shutil.rmtree(path)
        shutil.rmtree(tmp_path / f"r{trials}")
    assert trials >= 100, f"only {trials} trials in the time allowed"
    assert outcomes.get("typed error", 0) > trials // 4 and outcomes.get("opened", 0) > 0
    print(f"{trials} damaged stores: {outcomes}")


# --- random SIGKILLs with exact accounting -------------------------------------------------
WRITERS = 2


def _counting_writer(path: str, me: int, acked: Any) -> None:
    """Durably increment this writer's counter in transactions that also log each value,
    recording each acknowledged count; until killed."""
    with SafeFileStore(path) as store:
        while True:
            with store.transaction() as tx:
                count = tx.get(f"count{me}", 0) + 1
                tx[f"count{me}"] = count
                tx[f"log{me}:{count}"] = count
                tx.pop(f"log{me}:{count - 8}", None)
            acked.value = count
            if count % 3 == 0:
                store.modify(f"blind{me}", lambda n: n + 1, default=0)


@pytest.mark.slow
def test_random_sigkills_lose_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ctx = multiprocessing.get_context("fork")
    acked = [ctx.Value("q", 0, lock=False) for _ in range(WRITERS)]
    rng = random.Random(7)
    kills = rounds = 0
    deadline = time.monotonic() + 45
    while rounds < 300 and time.monotonic() < deadline:
        rounds += 1
        start = [a.value for a in acked]
        procs = [
            ctx.Process(target=_counting_writer, args=(str(path), i, acked[i]), daemon=True)
            for i in range(WRITERS)
        ]
        for p in procs:
            p.start()
        try:
            # Kill at a random instant once both are writing (bounded wait).
            wait_until = time.monotonic() + JOIN_TIMEOUT
            while (
                any(a.value == s for a, s in zip(acked, start, strict=True))
                and time.monotonic() < wait_until
            ):
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.01))
        finally:
            for p in procs:
                assert p.pid is not None
                os.kill(p.pid, signal.SIGKILL)
            for p in procs:
                p.join(JOIN_TIMEOUT)
                assert p.exitcode == -signal.SIGKILL
        kills += WRITERS
        with SafeFileStore(path, durable=False) as store:
            state = store.to_dict()
        for i in range(WRITERS):
            done, count = acked[i].value, state.get(f"count{i}", 0)
            # Every acknowledged transaction is there; the one in flight may be too.
            assert done <= count <= done + 1, (rounds, i, done, count)
            assert state[f"log{i}:{count}"] == count, "a transaction was half-applied"
            assert sorted(k for k in state if k.startswith(f"log{i}:")) == sorted(
                f"log{i}:{c}" for c in range(max(1, count - 7), count + 1)
            )
            acked[i].value = count  # the next round counts on from what is stored
    assert rounds >= 100, f"only {rounds} rounds in the time allowed"
    assert store_module.check_store(path).keys > 0
    print(
        f"{kills} SIGKILLs over {rounds} rounds; "
        f"{sum(a.value for a in acked)} acknowledged transactions checked"
    )
