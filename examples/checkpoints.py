"""Durable checkpoints in a ``SafeFileStore``: a batch job that resumes where it
stopped.

After each item the job records the item's result and its position in one
transaction, so the store always holds a consistent pair: a run killed at any moment
-- even by ``SIGKILL`` -- is resumed by the next run from the last committed
position. The only work done twice is the item that was in progress when the run
died; no result is lost or recorded twice.

``main()`` shows it: it starts the job in a child process, kills the child with
SIGKILL part-way through, runs the job again, and checks every result.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time

from safeshm import SafeFileStore


def open_store(directory: str) -> SafeFileStore[int]:
    # Creates the directory (mode 0700) on first use; durable=True (the default)
    # fsyncs every commit, so what was committed survives a power cut too, not just
    # a crash.
    return SafeFileStore(directory, durable=True)


def square(item: int) -> int:
    time.sleep(0.01)  # stands for real work
    return item * item


def run_job(directory: str, n_items: int) -> int:
    """Process items ``0 .. n_items - 1``, skipping those an earlier run completed.

    Returns how many items this run processed.
    """
    with open_store(directory) as store:
        # --8<-- [start:modify]
        # An atomic read-modify-write.
        store.modify("runs", lambda n: n + 1, default=0)
        # --8<-- [end:modify]
        start = store.get("next", 0)  # where the last run stopped
        for item in range(start, n_items):
            result = square(item)
            # --8<-- [start:transaction]
            # Both keys or neither, even if the process is killed here.
            with store.transaction() as tx:
                tx[f"result:{item}"] = result
                tx["next"] = item + 1
            # --8<-- [end:transaction]
        return n_items - start


def checkpoint(directory: str) -> int:
    with open_store(directory) as store:
        return store.get("next", 0)


def main(n_items: int = 100) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "checkpoints")

        # The first run, in a child process that is killed part-way through.
        child = multiprocessing.get_context("spawn").Process(
            target=run_job, args=(directory, n_items)
        )
        child.start()
        deadline = time.monotonic() + 30
        while checkpoint(directory) < 20:
            if time.monotonic() > deadline:
                child.kill()
                raise SystemExit("the first run made no progress")
            time.sleep(0.05)
        # SIGKILL: no clean-up, no atexit, possibly in the middle of a commit.
        child.kill()
        child.join(timeout=10)
        stopped_at = checkpoint(directory)
        print(f"first run killed after {stopped_at} of {n_items} items")

        # The second run resumes from the checkpoint.
        resumed = run_job(directory, n_items)
        print(f"second run processed the remaining {resumed}")

        with open_store(directory) as store:
            results = {key: value for key, value in store.items() if key.startswith("result:")}
            runs = store["runs"]
        if results != {f"result:{i}": i * i for i in range(n_items)} or runs != 2:
            raise SystemExit("a result is missing or wrong")
        # A commit the child had written whole but not yet synced when it was
        # killed is not acknowledged (checkpoint() did not see it), yet it is on
        # record: it takes effect when the next run syncs, and that run then starts
        # one item later.
        if n_items - resumed not in (stopped_at, stopped_at + 1):
            raise SystemExit("the second run did not resume from the checkpoint")


if __name__ == "__main__":
    main()
