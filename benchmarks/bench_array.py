"""Array benchmark: the multiprocessing and numpy idioms vs safeshm.SafeArray.

Usage::

    python benchmarks/bench_array.py [safeshm bench options] [--check-goals]

``safeshm bench --structures array`` (the same options: see ``safeshm bench --help``), then
how its ratios compare with the project's goals: see ``goals.py`` here and
``docs/benchmarks.md``. numpy is optional: without it the numpy contenders are skipped,
with a note.
"""

from goals import main

# Guarded: spawn-started workers re-import this script as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main(["array"]))
