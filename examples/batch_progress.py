"""Progress of a batch job in a ``SafeArray``, read by a separate monitor process.

Each worker owns one element of the array and stores how many items it has done;
a monitor -- any process of the same user, here one started as
``python batch_progress.py monitor NAME TOTAL`` -- attaches by name and reads
consistent snapshots, without ever slowing the workers down.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

from safeshm import SafeArray


def worker(progress: SafeArray[int], index: int, items: int) -> None:
    for done in range(1, items + 1):
        time.sleep(0.005)  # stands for one item of real work
        progress[index] = done  # an atomic store; only this worker writes here


def monitor(name: str, total: int, timeout: float = 30.0) -> None:
    """Print the job's progress until it is complete."""
    progress = SafeArray.attach(name, "q")  # typed SafeArray[int]; no creator needed
    try:
        deadline = time.monotonic() + timeout
        while True:
            per_worker = progress.to_list()  # one consistent snapshot of them all
            done = sum(per_worker)
            print(f"{done:4d}/{total} {per_worker}", flush=True)
            if done >= total:
                return
            if time.monotonic() > deadline:
                raise SystemExit("the batch job stalled")
            time.sleep(0.1)
    finally:
        progress.close()  # detach only: the job owns the array


def main(n_workers: int = 3, items: int = 40) -> None:
    spawn = multiprocessing.get_context("spawn")
    with SafeArray.create("q", n_workers) as progress:  # removed at the end
        watcher = subprocess.Popen(  # an unrelated process
            [sys.executable, __file__, "monitor", progress.name, str(n_workers * items)]
        )
        workers = [
            spawn.Process(target=worker, args=(progress, i, items)) for i in range(n_workers)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
        finished = progress.to_list() == [items] * n_workers
        if watcher.wait(timeout=30) != 0 or not finished:
            raise SystemExit(f"unexpected progress: {progress.to_list()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["monitor"]:
        monitor(sys.argv[2], int(sys.argv[3]))
    else:
        main()
