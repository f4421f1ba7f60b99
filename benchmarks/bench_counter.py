"""Counter benchmark: the multiprocessing idioms vs safeshm's counters, side by side.

Usage::

    python benchmarks/bench_counter.py [--processes 1 2 4] [--seconds 1] [--repeats 5] [--json]
                                       [--plot FILE.png] [--quiet]

The same as ``python -m safeshm bench --structures counter``; see :mod:`safeshm._bench`
and ``docs/benchmarks.md``.
"""

import sys

from safeshm._bench import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    # Only the counter part, as before ``safeshm bench`` also measured arrays.
    raise SystemExit(main(["--structures", "counter", *sys.argv[1:]]))
