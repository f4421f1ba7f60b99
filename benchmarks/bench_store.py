"""SafeFileStore benchmark: SafeFileStore vs diskcache (and shelve + flock).

Usage::

    python benchmarks/bench_store.py [safeshm bench options] [--check-goals]

``safeshm bench --structures store`` (the same options: see ``safeshm bench --help``), then
how its ratios compare with the project's goals: see ``goals.py`` here and
``docs/benchmarks.md``. diskcache is optional (``pip install diskcache``, or the ``bench``
extra); ``--store-dir`` chooses the file system to measure on.
"""

from goals import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main(["store"]))
