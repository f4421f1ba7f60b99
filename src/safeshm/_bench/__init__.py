"""``safeshm bench``: safeshm's structures against what users use today, in one process run.

One module per structure -- :mod:`.counter`, :mod:`.array`, :mod:`.queue`, :mod:`.store` --
on a shared measuring harness (:mod:`.harness`: spawned workers released together through
a barrier, warm-up, calibration, rotated round-robin repeats, every result checked); the
options (:mod:`.options`, shared with the scripts in ``benchmarks/``), the tables
(:mod:`.report`), the ``--plot`` chart (:mod:`.chart`) and the command that puts them
together (:mod:`.command`).

While it measures, a progress display on stderr says what is being measured, how far
along it is and about how long is left (``--quiet``: none); stdout gets the tables, or
with ``--json`` the results as one JSON document, whose ``"ratios"`` (see
:class:`.chart.Ratio`) ``--plot FILE.png`` charts with matplotlib (the optional ``plot``
extra). ``--from-json FILE`` measures nothing: it prints or charts results saved earlier.
``--quick`` takes one fixed-size measurement per contender: a first look in seconds.

This package reports measurements and ratios only. The project's own performance goals,
and the check that they are met, live outside the installed package, in
``benchmarks/goals.py``.

The CLI imports :mod:`.options` to build its parser and :mod:`.command` only when
``bench`` runs; nothing here imports the CLI. This ``__init__`` imports nothing, so that
building the parser stays cheap.
"""
