"""A work queue for a process pool started with ``spawn``.

The parent puts jobs into a ``SafeQueue`` and workers in a ``ProcessPoolExecutor``
take them until the queue is shut down, putting their results into a second queue.
The queues are passed to the workers as ordinary arguments: a safeshm handle pickles
as a reference, and the worker attaches by name.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from safeshm import QueueShutDown, SafeQueue

Job = int
Result = tuple[int, int, int]  # (job, result, worker pid)


def work(job: Job) -> int:
    time.sleep(0.001)  # stands for real work
    return job * job


def worker(jobs: SafeQueue[Job], results: SafeQueue[Result]) -> int:
    """Take jobs until the queue is shut down and drained; return how many."""
    done = 0
    while True:
        try:
            job = jobs.get()  # sleeps in the kernel while empty
        except QueueShutDown:  # the producer is done, and nothing is left
            return done
        results.put((job, work(job), os.getpid()))
        done += 1


def main(n_jobs: int = 400, n_workers: int = 4) -> None:
    spawn = multiprocessing.get_context("spawn")
    jobs: SafeQueue[Job] = SafeQueue.create(1 << 20)  # a 1 MiB ring
    results: SafeQueue[Result] = SafeQueue.create(1 << 20)
    with jobs, results, ProcessPoolExecutor(n_workers, mp_context=spawn) as pool:
        workers = [pool.submit(worker, jobs, results) for _ in range(n_workers)]
        try:
            for start in range(0, n_jobs, 100):
                # 100 jobs at once.
                jobs.put_many(range(start, min(start + 100, n_jobs)))
        finally:
            # No more jobs: the workers return once the queue is drained.
            jobs.shutdown()

        collected: dict[Job, int] = {}
        while len(collected) < n_jobs:
            for job, result, _pid in results.get_many(100, timeout=30):
                collected[job] = result
        counts = [w.result(timeout=30) for w in workers]

    expected = {job: work(job) for job in range(n_jobs)}
    if collected != expected or sum(counts) != n_jobs:
        raise SystemExit("a job was lost or done twice")
    print(f"{n_jobs} jobs done by {n_workers} workers: {counts}")


if __name__ == "__main__":
    main()
