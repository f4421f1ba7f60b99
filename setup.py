"""Build the optional compiled core, ``safeshm._native`` (everything else is in pyproject.toml).

Why setuptools: it is the one backend that builds an *optional* C extension with no
extra tooling -- ``Extension(optional=True)`` turns a missing compiler or missing Python
headers into a warning, and the pure package (the ctypes implementation) installs and
works. meson-python needs meson and ninja at build time and has no optional extensions;
hatchling builds no C at all without a plugin.

The extension uses the limited API of Python 3.11 (``py_limited_api``): one
``cp311-abi3`` wheel serves every Python from 3.11 on. Measured: it costs nothing on the
hot paths.

``SAFESHM_STRICT_BUILD=1`` (CI) makes the extension required and compiles it with
``-Werror``: a warning or a failed build fails the install instead of falling back.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup

strict = os.environ.get("SAFESHM_STRICT_BUILD", "") not in ("", "0")
sources = sorted(str(p) for p in Path("src/native").glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "safeshm._native",
            sources=sources,
            depends=["src/native/safeshm.h"],
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            py_limited_api=True,
            extra_compile_args=[
                "-std=gnu11",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
                *(["-Werror"] if strict else []),
            ],
            optional=not strict,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
