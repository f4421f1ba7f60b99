"""Array benchmark: the multiprocessing and numpy idioms vs safeshm.SafeArray.

Usage::

    python benchmarks/bench_array.py [--processes 1 2] [--seconds 1] [--repeats 5]
                                     [--bulk-elements 10000000] [--json]
                                     [--plot FILE.png] [--quiet]

The same as ``python -m safeshm bench --structures array``; see :mod:`safeshm._bench` and
``docs/benchmarks.md``. numpy is optional: without it the numpy contenders are skipped.
"""

import sys

from safeshm._bench import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main(["--structures", "array", *sys.argv[1:]]))
