"""``python -m safeshm``: see :mod:`safeshm._cli`."""

from ._cli import main

# Guarded: spawn-started worker processes re-import the main module as ``__mp_main__``.
if __name__ == "__main__":
    raise SystemExit(main())
