"""Check what ``python -m build`` made: ``python .ci/check_dist.py DIST_DIR`` (CI).

The wheel: one ``cp311-abi3`` wheel for this platform (the limited API of 3.11 serves every later
Python), carrying the compiled core and ``py.typed`` but no C sources, with the metadata
users and tools read (version from ``safeshm.__version__``, SPDX license and its file,
the ``safeshm`` console script). The sdist: everything a build from source and the test
suite need (the C sources, setup.py, the tests), and nothing built.

Exit status 1 and one line per problem if anything is wrong.
"""

from __future__ import annotations

import ast
import email.parser
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tag of a wheel built here: linux_x86_64, linux_aarch64.
PLATFORM = sysconfig.get_platform().replace("-", "_").replace(".", "_")


def source_version() -> str:
    tree = ast.parse((ROOT / "src" / "safeshm" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, str):
                return value
    raise SystemExit("no __version__ in src/safeshm/__init__.py")


def check_wheel(path: Path, version: str) -> list[str]:
    problems = []
    tag = f"cp311-abi3-{PLATFORM}"
    if path.name != f"safeshm-{version}-{tag}.whl":
        problems.append(f"{path.name}: expected safeshm-{version}-{tag}.whl")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        info = f"safeshm-{version}.dist-info"
        for required in (
            "safeshm/__init__.py",
            "safeshm/py.typed",
            "safeshm/_native.abi3.so",
            f"{info}/licenses/LICENSE",
            f"{info}/entry_points.txt",
        ):
            if required not in names:
                problems.append(f"{path.name}: {required} is missing")
        for name in names:
            if name.endswith((".c", ".h")) or name.startswith(("tests/", "src/", "native/")):
                problems.append(f"{path.name}: should not carry {name}")
        wheel = z.read(f"{info}/WHEEL").decode()
        if "Root-Is-Purelib: false" not in wheel or f"Tag: {tag}" not in wheel:
            problems.append(f"{path.name}: WHEEL says\n{wheel}")
        meta = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        expected = {
            "Name": "safeshm",
            "Version": version,
            "License-Expression": "MIT",
            "License-File": "LICENSE",
            "Requires-Python": ">=3.11",
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                problems.append(f"{path.name}: METADATA {key} is {meta.get(key)!r}, not {value!r}")
        if meta.get_all("Requires-Dist") and any(
            "extra ==" not in d for d in meta.get_all("Requires-Dist") or []
        ):
            problems.append(f"{path.name}: a runtime dependency: {meta.get_all('Requires-Dist')}")
        scripts = z.read(f"{info}/entry_points.txt").decode()
        if "[console_scripts]\nsafeshm = safeshm._cli:main" not in scripts:
            problems.append(f"{path.name}: entry points are\n{scripts}")
    return problems


def check_sdist(path: Path, version: str) -> list[str]:
    problems = []
    top = f"safeshm-{version}"
    if path.name != f"{top}.tar.gz":
        problems.append(f"{path.name}: expected {top}.tar.gz")
    with tarfile.open(path) as t:
        names = {n.removeprefix(f"{top}/") for n in t.getnames()}
    for required in (
        "PKG-INFO",
        "pyproject.toml",
        "setup.py",
        "LICENSE",
        "README.md",
        "src/native/safeshm.h",
        "src/native/module.c",
        "src/safeshm/__init__.py",
        "src/safeshm/py.typed",
        "tests/conftest.py",
        "tests/test_implementation.py",
    ):
        if required not in names:
            problems.append(f"{path.name}: {required} is missing")
    sources = {n for n in names if n.startswith("src/native/") and n.endswith(".c")}
    in_tree = {str(p.relative_to(ROOT)) for p in (ROOT / "src" / "native").glob("*.c")}
    if sources != in_tree:
        problems.append(f"{path.name}: C sources {sorted(sources)}, the tree has {sorted(in_tree)}")
    for name in names:
        if name.endswith(".so") or "__pycache__" in name:
            problems.append(f"{path.name}: should not carry {name}")
    return problems


def main(dist: Path) -> int:
    version = source_version()
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    problems = []
    if len(wheels) != 1 or len(sdists) != 1:
        problems.append(f"{dist}: expected one wheel and one sdist, found {wheels + sdists}")
    for wheel in wheels:
        problems += check_wheel(wheel, version)
    for sdist in sdists:
        problems += check_sdist(sdist, version)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"ok: {', '.join(p.name for p in wheels + sdists)} (version {version})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
