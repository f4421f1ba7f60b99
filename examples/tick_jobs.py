"""One scheduled job per tick across worker processes, with ``safeshm.TickLeader``.

Three worker processes -- standing for uvicorn or gunicorn workers -- each run the same
schedule: an asyncio loop (``aiter_ticks``) in two of them, a background thread
(``iter_ticks``) in the third. At every tick exactly one of them runs the job; the
others sleep through it. Each run is recorded in a ``SafeArray`` indexed by tick, and
``main()`` checks that no tick ran twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
import time

from safeshm import SafeArray, SafeEvent, TickLeader

EVERY = 0.1  # seconds per tick (a real job would say 60 or 3600)
TICKS = 10  # how many ticks the demo records
MAX_RUN = EVERY * 5  # a run holding the lead longer makes skipped ticks warn (hung job?)


def job(tick: int, runs: SafeArray[int], first: int) -> None:
    """The scheduled work: here, record who ran which tick."""
    if first <= tick < first + TICKS:
        runs.add(tick - first, 1)
        print(f"tick {tick}: job run by worker {os.getpid()}", flush=True)


async def async_worker(name: str, runs_name: str, first: int, stop_name: str) -> None:
    """A FastAPI/uvicorn worker would start this from its lifespan handler."""
    # Every worker: same name, same schedule.
    leader = TickLeader.open(name, EVERY, max_run=MAX_RUN)
    runs = SafeArray.attach(runs_name, "q")
    stop = SafeEvent.attach(stop_name)
    try:

        async def loop() -> None:
            async with contextlib.aclosing(leader.aiter_ticks()) as ticks:
                async for tick in ticks:  # yields only in the worker that leads
                    try:
                        job(tick, runs, first)
                    except Exception:  # one failed run must not end the loop
                        logging.exception("job failed at tick %d", tick)

        task = asyncio.create_task(loop())
        while not stop.is_set():  # the app serving requests meanwhile
            await asyncio.sleep(0.02)
        task.cancel()  # shutting down: the lifespan handler cancels the loop
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        stop.close()
        runs.close()
        leader.close()  # close only: the others still use it


def thread_worker(name: str, runs_name: str, first: int, stop_name: str) -> None:
    """A gunicorn (sync) worker would start this thread in its post_fork hook."""
    leader = TickLeader.open(name, EVERY, max_run=MAX_RUN)
    runs = SafeArray.attach(runs_name, "q")
    stop = SafeEvent.attach(stop_name)
    try:

        def loop() -> None:
            for tick in leader.iter_ticks(stop):  # ends when `stop` is set
                try:
                    job(tick, runs, first)
                except Exception:  # one failed run must not end the loop
                    logging.exception("job failed at tick %d", tick)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        thread.join(timeout=30)
    finally:
        stop.close()
        runs.close()
        leader.close()


def run_async_worker(name: str, runs_name: str, first: int, stop_name: str) -> None:
    asyncio.run(async_worker(name, runs_name, first, stop_name))


def main() -> None:
    spawn = multiprocessing.get_context("spawn")
    with (
        TickLeader.create(EVERY, max_run=MAX_RUN) as leader,  # removed at the end
        SafeArray.create("q", TICKS) as runs,
        SafeEvent.create() as stop,
    ):
        first = leader.current_tick() + round(2.0 / EVERY)  # time for the workers to start
        args = (leader.name, runs.name, first, stop.name)
        workers = [
            spawn.Process(target=run_async_worker, args=args),
            spawn.Process(target=run_async_worker, args=args),
            spawn.Process(target=thread_worker, args=args),
        ]
        for w in workers:
            w.start()
        try:
            time.sleep(max(0.0, leader.tick_time(first + TICKS) - time.time()))
            stop.set()
        finally:
            for w in workers:
                w.join(timeout=30)
                if w.is_alive():
                    w.kill()
                    w.join()
        counts = runs.to_list()
        stats = leader.statistics()
        print(f"runs per tick: {counts}; {stats.runs} runs, {stats.skipped} skipped")
        if max(counts) > 1:
            raise SystemExit("a tick ran twice")
        if any(w.exitcode != 0 for w in workers):
            raise SystemExit("a worker failed")


if __name__ == "__main__":
    main()
