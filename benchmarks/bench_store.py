"""SafeFileStore benchmark: SafeFileStore vs diskcache (and shelve + flock).

Usage::

    python benchmarks/bench_store.py [--repeats 5] [--store-dir DIR] [--json]

See :mod:`safeshm._bench_store` for what is measured and ``docs/benchmarks.md`` for
results. diskcache is optional (``pip install diskcache``, or the ``bench`` extra).
"""

import argparse
import dataclasses
import json
import sys

from safeshm import _bench_store

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--store-dir", default=None,
                        help="directory (file system) to measure in; default: a temp dir")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cells = _bench_store.measure(args.repeats, args.store_dir,
                                 lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"cells": [dataclasses.asdict(c) for c in cells],
                          "ratios": _bench_store.ratios(cells),
                          "scaling": _bench_store.scaling(cells)}, indent=2))
    else:
        print(_bench_store.report(cells))
