"""``safeshm bench``: progress display, JSON, ``--plot``, ``--from-json``; and every
subcommand's answer to bad arguments (one line, a non-zero exit, never a traceback).

The measurements here are tiny (one counter process count, ~0.01 s, one repeat): they check
the plumbing, not the numbers.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _bench, _compat
from safeshm._cli import main

from ._helpers import JOIN_TIMEOUT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent
TINY = ["--structures", "counter", "--processes", "1", "--seconds", "0.01", "--repeats", "1"]
STEP = re.compile(r"^\[ ?\d+/\d+\] \d+:\d\d counter: .+, 1P, (warm-up|calibrating|repeat 1/1) "
                  r"\.\.\.$")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "safeshm", *args], capture_output=True,
                          text=True, timeout=JOIN_TIMEOUT * 2, check=False, cwd=cwd)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``safeshm argv`` in this process: (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's usage errors
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """One tiny measurement with ``--json`` (stdout, stderr, the JSON saved in a file)."""
    proc = run_cli("bench", *TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path_factory.mktemp("bench") / "results.json"
    path.write_text(proc.stdout)
    return proc.stdout, proc.stderr, path


# -- progress, JSON ------------------------------------------------------------------------------
def test_progress_on_stderr_and_pure_json_on_stdout(measured: tuple[str, str, Path]) -> None:
    stdout, stderr, _ = measured
    results = json.loads(stdout)  # nothing but the JSON document
    assert results["config"]["structures"] == ["counter"]
    lines = stderr.splitlines()
    steps = [line for line in lines if line.startswith("[")]
    # 4 implementations x (warm-up, calibration, 1 repeat), counted in advance exactly.
    assert len(steps) == 13
    assert all(STEP.match(line) for line in steps[:-1]), steps
    assert steps[0].startswith("[ 1/12] ")
    assert re.match(r"^\[12/12\] \d+:\d\d measured$", steps[-1])
    assert "\r" not in stderr and "\x1b" not in stderr  # not a terminal: plain lines


def test_json_lists_the_ratios_the_chart_draws(measured: tuple[str, str, Path]) -> None:
    results = json.loads(measured[0])
    ratios = results["ratios"]
    assert {(r["label"], r["versus"]) for r in ratios} == {
        (f"{impl}.add, 1 process", alt) for impl in ("SafeCounter", "ShardedCounter")
        for alt in ("mp.Value idiom", "mp.Lock + RawValue")}
    for r in ratios:
        assert set(r) == {"structure", "label", "versus", "ratio", "goal"}
        assert r["structure"] == "SafeCounter & ShardedCounter"
        assert r["ratio"] > 0
    goals = {(r["label"], r["versus"]): r["goal"] for r in ratios}
    # The same goals as the bars the tables check.
    assert goals["SafeCounter.add, 1 process", "mp.Value idiom"] == 1.2
    assert goals["ShardedCounter.add, 1 process", "mp.Value idiom"] == 4.0
    assert goals["SafeCounter.add, 1 process", "mp.Lock + RawValue"] is None
    by_bar = {b["description"]: b["measured"] for b in results["bars"]}
    ratio = {(r["label"], r["versus"]): r["ratio"] for r in ratios}
    assert ratio["SafeCounter.add, 1 process", "mp.Value idiom"] == pytest.approx(
        by_bar["SafeCounter add, 1 process, vs the mp.Value idiom (1 process)"])


def test_progress_line_is_rewritten_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = _bench._Progress(3, stream)
    progress.step("counter: SafeCounter, 1P, warm-up")
    progress.step("counter: SafeCounter, 1P, calibrating")
    assert "\n" not in stream.getvalue()
    assert stream.getvalue().count("\r") == 2 and "\x1b[K" in stream.getvalue()
    progress.interrupt()  # a message that follows starts on a line of its own
    assert stream.getvalue().endswith("\n")
    progress.step("counter: SafeCounter, 1P, repeat 1/1")
    progress.finish()
    last = stream.getvalue().split("\r")[-1]
    assert re.match(r"^\[3/3\] \d+:\d\d measured\x1b\[K\n$", last)


def test_quiet_progress_prints_nothing() -> None:
    progress = _bench._Progress(2, None)
    progress.step("x")
    progress.interrupt()
    progress.finish()
    assert progress.done == 1


# -- the chart -------------------------------------------------------------------------------
def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # a real chart, not an empty canvas
    # No temporary file left beside it.
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")] == []


def test_plot_from_a_tiny_measurement_quietly(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "chart.png"
    proc = run_cli("bench", *TINY, "--quiet", "--plot", str(chart))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress, no "chart written"
    assert "vs mp.Value" in proc.stdout  # the tables, as without --plot
    assert_png(chart)


def test_replot_and_reprint_from_saved_json(measured: tuple[str, str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "again.png"
    status, out, err = run_main(["bench", "--from-json", str(measured[2]), "--plot",
                                 str(chart)], capsys)
    assert status == 0, err
    assert "SafeCounter and ShardedCounter" in out and "Bars" in out  # the tables
    assert err == f"chart written to {chart}\n"
    assert_png(chart)
    status, out, err = run_main(["bench", "--from-json", str(measured[2]), "--json"], capsys)
    assert status == 0
    assert json.loads(out) == json.loads(measured[0])


@pytest.mark.parametrize("spread", ["linear", "log"])
def test_plot_ratios_takes_any_structure(tmp_path: Path, spread: str) -> None:
    """A structure the plotting code has never heard of gets its own panel."""
    pytest.importorskip("matplotlib")
    big = 3.0 if spread == "linear" else 40.0
    ratios = [
        _bench.Ratio("SafeCounter", "add, 1 process", "mp.Value idiom", 1.8, 1.2),
        _bench.Ratio("SafeCounter", "add, 2 processes", "mp.Value idiom", 0.7, 3.0),
        _bench.Ratio("SafeFileStore", "set, 2 processes", "diskcache", big, None),
        _bench.Ratio("SafeFileStore", "set, 2 processes", "fcntl by hand", 1.1, None),
    ]
    chart = tmp_path / "generic.png"
    _bench.plot_ratios(ratios, str(chart), title="t", subtitle="s", footnote="f")
    assert_png(chart)
    with pytest.raises(ValueError, match="nothing to plot"):
        _bench.plot_ratios([], str(tmp_path / "empty.png"), title="t", subtitle="s",
                           footnote="f")


def test_missing_matplotlib_is_reported_before_measuring(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    # `import matplotlib` (and of any of its modules an earlier test imported) fails.
    for module in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, module, None)

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured before checking for matplotlib")

    monkeypatch.setattr(_bench, "_measure_all", must_not_run)
    monkeypatch.setattr(_bench, "environment", must_not_run)
    status, out, err = run_main(["bench", *TINY, "--plot", str(tmp_path / "c.png")], capsys)
    assert status == 2
    assert out == ""
    assert err == "safeshm bench --plot needs matplotlib: pip install 'safeshm[plot]'\n"
    assert not (tmp_path / "c.png").exists()


# -- bad arguments: one line, a non-zero exit, never a traceback -----------------------------
@pytest.fixture
def a_directory_segment() -> Iterator[str]:
    """A name whose segment "file" is a directory."""
    name = f"t{os.getpid()}-dir"
    path = os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name)
    os.mkdir(path)
    try:
        yield name
    finally:
        os.rmdir(path)


def assert_clean_failure(status: int, err: str, *, usage: bool) -> None:
    assert status != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines, "no message"
    if usage:  # argparse: the usage, then one line naming the problem
        assert re.match(r"^safeshm( \w+)?: error: ", lines[-1]), err
    else:
        assert len(lines) == 1 and lines[0].startswith("safeshm"), err


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["ls", "--bogus"], ["inspect"], ["rm", "--bogus"],
    ["demo", "--workers", "0"], ["demo", "--workers", "x"], ["demo", "--workers", "-3"],
    ["demo", "--workers", "100000000000000000000"],
    ["bench", "--seconds", "-1"], ["bench", "--seconds", "0"], ["bench", "--seconds", "x"],
    ["bench", "--seconds", "inf"], ["bench", "--seconds", "nan"], ["bench", "--seconds", "1e9"],
    ["bench", "--processes", "0"], ["bench", "--processes", "x"],
    ["bench", "--processes", "100000"], ["bench", "--processes"],
    ["bench", "--repeats", "0"], ["bench", "--repeats", "2.5"],
    ["bench", "--structures", "foo"], ["bench", "--bulk-elements", "-5"],
    ["bench", "--bulk-elements", "1e6"], ["bench", "extra"], ["bench", "--plot"],
])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(argv, capsys)
    assert status == 2
    assert_clean_failure(status, err, usage=True)
    assert out == ""


@pytest.mark.parametrize(("argv", "status", "message"), [
    (["inspect", "bad/name"], 2, "is not valid"),
    (["inspect", ""], 2, "must not be empty"),
    (["inspect", "x" * 300], 2, "the limit is"),
    (["inspect", "no-such-segment"], 1, "no segment named"),
    (["rm", "--yes", "../etc"], 2, "is not valid"),
    (["rm", "--yes", "no-such-segment"], 1, "no segment named"),
])
def test_bad_names(argv: list[str], status: int, message: str,
                   capsys: pytest.CaptureFixture[str]) -> None:
    got, _, err = run_main(argv, capsys)
    assert got == status
    assert_clean_failure(got, err, usage=False)
    assert message in err


@pytest.mark.parametrize("command", ["inspect", "rm"])
def test_a_directory_where_a_segment_should_be(command: str, a_directory_segment: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, a_directory_segment] + (["--yes"] if command == "rm" else [])
    status, _, err = run_main(argv, capsys)
    assert status == 1
    assert_clean_failure(status, err, usage=False)
    assert "Is a directory" in err


def test_rm_without_an_answer_leaves_the_segment(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                cleanup: Any, name: str) -> None:
    cleanup(safeshm.SafeCounter.create(name=name))

    def closed_stdin(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", closed_stdin)
    status, _, err = run_main(["rm", name], capsys)
    assert status == 1
    assert "Traceback" not in err and "--yes" in err
    assert os.path.exists(os.path.join(_compat.SHM_DIR, _compat.FILE_PREFIX + name))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_from_json_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          measured: tuple[str, str, Path]) -> None:
    saved = str(measured[2])
    no_ratios = json.loads(measured[0])
    del no_ratios["ratios"]
    bad_ratio = json.loads(measured[0])
    bad_ratio["ratios"][0]["ratio"] = "fast"
    cases = [
        (["--from-json", str(tmp_path / "missing.json")], "cannot read"),
        (["--from-json", str(tmp_path)], "cannot read"),
        (["--from-json", write(tmp_path / "a.json", "{not json")], "is not JSON"),
        (["--from-json", write(tmp_path / "b.json", "[1, 2]")], "not the output of"),
        (["--from-json", write(tmp_path / "c.json", '{"environment": {}}')],
         "lacks what the tables need"),
        (["--from-json", saved, "--seconds", "1", "--processes", "2"],
         "cannot be combined with --processes, --seconds"),
    ]
    if _bench._plot_problem(str(tmp_path / "x.png")) is None:  # matplotlib is importable
        png = str(tmp_path / "x.png")
        cases += [
            (["--from-json", write(tmp_path / "d.json", json.dumps(no_ratios)), "--plot", png],
             "no 'ratios' list"),
            (["--from-json", write(tmp_path / "e.json", json.dumps(bad_ratio)), "--plot", png],
             "not a ratio"),
        ]
    for args, message in cases:
        status, out, err = run_main(["bench", *args], capsys)
        assert status == 2, (args, err)
        assert_clean_failure(status, err, usage=False)
        assert message in err, (args, err)
        assert out == ""
    assert not (tmp_path / "x.png").exists()


def test_plot_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    for target, message in [
        (tmp_path, "is a directory"),
        (tmp_path / "no" / "such" / "dir" / "c.png", "there is no directory"),
        (tmp_path / "chart.txt", "must end in .png"),
        (tmp_path / "chart", "must end in .png"),
    ]:
        status, _, err = run_main(["bench", *TINY, "--plot", str(target)], capsys)
        assert status == 2, (target, err)
        assert_clean_failure(status, err, usage=False)
        assert message in err, (target, err)


def test_bulk_part_that_cannot_fit_is_refused_before_measuring(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("numpy")
    monkeypatch.setattr(_bench, "_measure_all", None)  # measuring would fail the test
    status, _, err = run_main(["bench", "--structures", "array", "--bulk-elements",
                               str(1 << 35)], capsys)
    assert status == 2
    assert_clean_failure(status, err, usage=False)
    assert "MB free in /dev/shm" in err


@pytest.mark.parametrize("argv", [
    ["bench", "--seconds", "inf"],
    ["bench", "--plot", "/no/such/dir/chart.png"],
    ["bench", "--from-json", "/no/such/results.json"],
])
def test_bad_bench_arguments_in_a_fresh_process(argv: list[str]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("safeshm")


def test_benchmark_scripts_take_the_same_arguments() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_counter.py"),
                           "--repeats", "0"], capture_output=True, text=True,
                          timeout=JOIN_TIMEOUT, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "safeshm bench: error: argument --repeats: must be at least 1" in proc.stderr


def test_bench_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(["bench", "--help"], capsys)
    assert status == 0
    for option in ("--processes", "--seconds", "--repeats", "--structures", "--bulk-elements",
                   "--json", "--plot", "--from-json", "--quiet"):
        assert option in out
