"""Queue benchmark: multiprocessing.Queue, SimpleQueue and faster_fifo vs safeshm.SafeQueue.

Usage::

    python benchmarks/bench_queue.py [--processes 1 2] [--seconds 1] [--repeats 5] [--json]
                                     [--plot FILE.png] [--quiet]

The same as ``python -m safeshm bench --structures queue``; see :mod:`safeshm._bench` and
``docs/benchmarks.md``. ``--processes N`` means N producers and N consumers. faster_fifo is
optional (``pip install faster-fifo``, or the ``bench`` extra): without it its rows are
skipped with a note.
"""

import sys

from safeshm._bench import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main(["--structures", "queue", *sys.argv[1:]]))
