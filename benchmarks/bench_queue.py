"""Queue benchmark: multiprocessing.Queue, SimpleQueue and faster_fifo vs safeshm.SafeQueue.

Usage::

    python benchmarks/bench_queue.py [safeshm bench options] [--check-goals]

``safeshm bench --structures queue`` (the same options: see ``safeshm bench --help``), then
how its ratios compare with the project's goals: see ``goals.py`` here and
``docs/benchmarks.md``. ``--processes N`` means N producers and N consumers. faster_fifo
is optional (``pip install faster-fifo``, or the ``bench`` extra): without it its rows are
skipped with a note.
"""

from goals import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main(["queue"]))
