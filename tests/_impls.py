"""The two implementations (``safeshm.implementation()``): the compiled core and ctypes.

The suite runs once per implementation (CI: a second pass with ``SAFESHM_NO_EXTENSIONS=1``).
Mixed tests share one structure between processes of both kinds: this process is one
kind, and :func:`env_for` makes a subprocess the other.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

import safeshm

IMPLEMENTATION = safeshm.implementation()
NATIVE_BUILT = importlib.util.find_spec("safeshm._native") is not None
"""Whether the extension is built (whatever this process uses)."""

needs_native = pytest.mark.skipif(
    not NATIVE_BUILT, reason="the compiled core (safeshm._native) is not built here"
)


UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
"""Whether this process runs under AddressSanitizer (.ci/sanitize preloads libasan)."""


def skip_rss_under_asan() -> None:
    """RSS says nothing about leaks under AddressSanitizer, which keeps freed memory in
    quarantine: a test that measures RSS is skipped there (its refcount checks and every
    other test still run under ASan, and it runs normally in every CI pass)."""
    if UNDER_ASAN:
        pytest.skip("AddressSanitizer quarantines freed memory: RSS measures nothing here")


def env_for(implementation: str) -> dict[str, str]:
    """The environment of a subprocess that uses ``implementation`` ("native"/"ctypes")."""
    if implementation not in ("native", "ctypes"):
        raise ValueError(implementation)
    env = dict(os.environ)
    env.pop("SAFESHM_NO_EXTENSIONS", None)
    if implementation == "ctypes":
        env["SAFESHM_NO_EXTENSIONS"] = "1"
    return env


def other() -> str:
    """The implementation this process does not use."""
    return "ctypes" if IMPLEMENTATION == "native" else "native"
