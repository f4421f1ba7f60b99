"""Lock benchmark: `with multiprocessing.Lock():` vs `with safeshm.SafeLock:`, side by side.

Usage::

    python benchmarks/bench_lock.py [safeshm bench options] [--check-goals]

``safeshm bench --structures lock`` (the same options: see ``safeshm bench --help``), then
how its ratios compare with the project's goals: see ``goals.py`` here and
``docs/benchmarks.md``.
"""

from goals import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main(["lock"]))
