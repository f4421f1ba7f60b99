"""``safeshm bench``: progress display with its estimate of the time left, JSON, ``--plot``,
``--from-json``, ``--quick``; the project's goals, which live in ``benchmarks/`` and not in
the package; and every subcommand's answer to bad arguments (one line, a non-zero exit,
never a traceback).

The measurements here are tiny (one counter process count, ~0.01 s, one repeat): they check
the plumbing, not the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _compat
from safeshm._bench import array, chart, command, counter, harness, lock, options, queue
from safeshm._cli import main

from ._helpers import JOIN_TIMEOUT
from ._impls import NATIVE_BUILT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent
TINY = ["--structures", "counter", "--processes", "1", "--seconds", "0.01", "--repeats", "1"]
STEP = re.compile(
    r"^\[ ?\d+/\d+\] \d+:\d\d( \(~\d+:\d\d left\))? counter: .+, 1P, "
    r"(warm-up|calibrating|repeat 1/1) \.\.\.$"
)
SCRIPTS = ROOT / "benchmarks"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safeshm", *args],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
        cwd=cwd,
    )


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
    # 2 stdlib idioms and 2 safeshm counters per implementation, x (warm-up, calibration,
    # 1 repeat), counted in advance exactly.
    total = 3 * len(counter.contenders(tuple(results["config"]["variants"])))
    assert total == 3 * (2 + 2 * len(results["config"]["variants"]))
    assert len(steps) == total + 1
    assert all(STEP.match(line) for line in steps[:-1]), steps
    assert steps[0].startswith(f"[ 1/{total}] ")
    assert "left" not in steps[0]  # nothing done yet: no estimate
    assert all(" left) counter: " in line for line in steps[1:-1]), steps
    assert re.match(rf"^\[{total}/{total}\] \d+:\d\d measured$", steps[-1])
    assert "\r" not in stderr and "\x1b" not in stderr  # not a terminal: plain lines


def test_json_lists_the_ratios_the_chart_draws(measured: tuple[str, str, Path]) -> None:
    results = json.loads(measured[0])
    ratios = results["ratios"]
    assert {(r["label"], r["versus"]) for r in ratios} == {
        (f"{impl}.add, 1 process, {variant}", alt)
        for impl in ("SafeCounter", "ShardedCounter")
        for variant in results["config"]["variants"]
        for alt in ("mp.Value idiom", "mp.Lock + RawValue")
    }
    for r in ratios:
        assert set(r) == {"structure", "label", "versus", "ratio", "goal"}
        assert r["structure"] == "SafeCounter & ShardedCounter"
        assert r["ratio"] > 0
        # The project's goals are not a user's concern: `safeshm bench` sets none.
        assert r["goal"] is None
    ratio = {(r["label"], r["versus"]): r["ratio"] for r in ratios}
    row = {(r["implementation"], r["variant"], r["processes"]): r for r in results["results"]}
    assert ratio["SafeCounter.add, 1 process, ctypes", "mp.Value idiom"] == pytest.approx(
        row["SafeCounter", "ctypes", 1]["vs_idiom_same_processes"]
    )


def test_progress_line_is_rewritten_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = harness.Progress(3, stream)
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
    progress = harness.Progress(2, None)
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


def test_replot_and_reprint_from_saved_json(
    measured: tuple[str, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    chart = tmp_path / "again.png"
    status, out, err = run_main(
        ["bench", "--from-json", str(measured[2]), "--plot", str(chart)], capsys
    )
    assert status == 0, err
    assert "SafeCounter and ShardedCounter" in out and "vs mp.Value" in out  # the tables
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
        chart.Ratio("SafeCounter", "add, 1 process", "mp.Value idiom", 1.8, 1.2),
        chart.Ratio("SafeCounter", "add, 2 processes", "mp.Value idiom", 0.7, 3.0),
        chart.Ratio("SafeFileStore", "set, 2 processes", "diskcache", big, None),
        chart.Ratio("SafeFileStore", "set, 2 processes", "fcntl by hand", 1.1, None),
    ]
    png = tmp_path / "generic.png"
    chart.plot_ratios(ratios, str(png), title="t", subtitle="s", footnote="f")
    assert_png(png)
    with pytest.raises(ValueError, match="nothing to plot"):
        chart.plot_ratios([], str(tmp_path / "empty.png"), title="t", subtitle="s", footnote="f")


def test_missing_matplotlib_is_reported_before_measuring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # `import matplotlib` (and of any of its modules an earlier test imported) fails.
    for module in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, module, None)

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured before checking for matplotlib")

    monkeypatch.setattr(command, "_measure_all", must_not_run)
    monkeypatch.setattr(command, "environment", must_not_run)
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


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["ls", "--bogus"],
        ["inspect"],
        ["rm", "--bogus"],
        ["demo", "--workers", "0"],
        ["demo", "--workers", "x"],
        ["demo", "--workers", "-3"],
        ["demo", "--workers", "100000000000000000000"],
        ["bench", "--seconds", "-1"],
        ["bench", "--seconds", "0"],
        ["bench", "--seconds", "x"],
        ["bench", "--seconds", "inf"],
        ["bench", "--seconds", "nan"],
        ["bench", "--seconds", "1e9"],
        ["bench", "--processes", "0"],
        ["bench", "--processes", "x"],
        ["bench", "--processes", "100000"],
        ["bench", "--processes"],
        ["bench", "--repeats", "0"],
        ["bench", "--repeats", "2.5"],
        ["bench", "--structures", "foo"],
        ["bench", "--bulk-elements", "-5"],
        ["bench", "--bulk-elements", "1e6"],
        ["bench", "extra"],
        ["bench", "--plot"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(argv, capsys)
    assert status == 2
    assert_clean_failure(status, err, usage=True)
    assert out == ""


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["inspect", "bad/name"], 2, "is not valid"),
        (["inspect", ""], 2, "must not be empty"),
        (["inspect", "x" * 300], 2, "the limit is"),
        (["inspect", "no-such-segment"], 1, "no segment named"),
        (["rm", "--yes", "../etc"], 2, "is not valid"),
        (["rm", "--yes", "no-such-segment"], 1, "no segment named"),
    ],
)
def test_bad_names(
    argv: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got, _, err = run_main(argv, capsys)
    assert got == status
    assert_clean_failure(got, err, usage=False)
    assert message in err


@pytest.mark.parametrize("command", ["inspect", "rm"])
def test_a_directory_where_a_segment_should_be(
    command: str, a_directory_segment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, a_directory_segment] + (["--yes"] if command == "rm" else [])
    status, _, err = run_main(argv, capsys)
    assert status == 1
    assert_clean_failure(status, err, usage=False)
    assert "Is a directory" in err


def test_rm_without_an_answer_leaves_the_segment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cleanup: Any, name: str
) -> None:
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


def test_from_json_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], measured: tuple[str, str, Path]
) -> None:
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
        (
            ["--from-json", write(tmp_path / "c.json", '{"environment": {}}')],
            "lacks what the tables need",
        ),
        (
            ["--from-json", saved, "--seconds", "1", "--processes", "2"],
            "cannot be combined with --processes, --seconds",
        ),
    ]
    if chart.plot_problem(str(tmp_path / "x.png")) is None:  # matplotlib is importable
        png = str(tmp_path / "x.png")
        cases += [
            (
                ["--from-json", write(tmp_path / "d.json", json.dumps(no_ratios)), "--plot", png],
                "no 'ratios' list",
            ),
            (
                ["--from-json", write(tmp_path / "e.json", json.dumps(bad_ratio)), "--plot", png],
                "not a ratio",
            ),
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
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("numpy")
    monkeypatch.setattr(command, "_measure_all", None)  # measuring would fail the test
    status, _, err = run_main(
        ["bench", "--structures", "array", "--bulk-elements", str(1 << 35)], capsys
    )
    assert status == 2
    assert_clean_failure(status, err, usage=False)
    assert "MB free in /dev/shm" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--seconds", "inf"],
        ["bench", "--plot", "/no/such/dir/chart.png"],
        ["bench", "--from-json", "/no/such/results.json"],
    ],
)
def test_bad_bench_arguments_in_a_fresh_process(argv: list[str]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("safeshm")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<name> args`` with this checkout's safeshm first on the path."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    "script",
    [
        "bench_counter.py",
        "bench_lock.py",
        "bench_array.py",
        "bench_queue.py",
        "bench_store.py",
        "goals.py",
    ],
)
def test_benchmark_scripts_take_the_same_arguments(script: str) -> None:
    proc = run_script(script, "--repeats", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{script}: error: argument --repeats: must be at least 1" in proc.stderr
    help_text = run_script(script, "--help").stdout
    for option in (
        "--quick",
        "--processes",
        "--seconds",
        "--repeats",
        "--structures",
        "--bulk-elements",
        "--store-dir",
        "--json",
        "--plot",
        "--from-json",
        "--quiet",
        "--check-goals",
        "--compare-with",
    ):
        assert option in help_text, (script, option)


def test_bench_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(["bench", "--help"], capsys)
    assert status == 0
    for option in (
        "--quick",
        "--processes",
        "--seconds",
        "--repeats",
        "--structures",
        "--bulk-elements",
        "--store-dir",
        "--json",
        "--plot",
        "--from-json",
        "--quiet",
    ):
        assert option in out
    assert "--check-goals" not in out  # the project's goals live in benchmarks/


# -- --quick and the estimate of the time left --------------------------------------------------
def test_quick_takes_one_fixed_size_sample_per_contender() -> None:
    proc = run_cli("bench", "--quick", "--structures", "counter", "--processes", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results["config"]["quick"] is True
    assert results["config"]["repeats"] == 1
    # Workers forked from a forkserver: no interpreter start per worker.
    assert results["environment"]["start_method"] == "forkserver"
    for row in results["results"]:
        assert row["ops_per_worker"] == counter._QUICK_OPS  # no calibration
        assert len(row["samples_ops_per_s"]) == 1
    steps = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    # No warm-up, no calibration: one step per contender, then "measured".
    contenders = counter.contenders(tuple(results["config"]["variants"]))
    assert len(steps) == len(contenders) + 1, steps
    assert all("repeat 1/1" in line for line in steps[:-1]), steps
    assert steps[-1].endswith("measured")


def test_quick_defaults_and_what_overrides_them() -> None:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    quick = options.settings(parser.parse_args(["--quick"]))
    assert (quick.quick, quick.repeats, quick.bulk_elements, quick.processes) == (
        True,
        options.QUICK_REPEATS,
        options.QUICK_BULK_ELEMENTS,
        list(options.DEFAULT_PROCESSES),
    )
    assert quick.structures == list(options.STRUCTURES)
    given = options.settings(
        parser.parse_args(["--quick", "--repeats", "3", "--bulk-elements", "1000"])
    )
    assert (given.repeats, given.bulk_elements) == (3, 1000)
    full = options.settings(parser.parse_args([]))
    assert (full.quick, full.repeats) == (False, options.DEFAULT_REPEATS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quick", "--seconds", "1"], "cannot be combined with --seconds"),
        (["--from-json", "x.json", "--quick"], "cannot be combined with --quick"),
        (["--from-json", "x.json", "--store-dir", "/tmp"], "cannot be combined with --store-dir"),
    ],
)
def test_quick_conflicts(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(["bench", *argv], capsys)
    assert status == 2
    assert_clean_failure(status, err, usage=False)
    assert message in err and out == ""


def test_time_left_is_the_pace_so_far_times_the_weight_to_come() -> None:
    now = [100.0]
    stream = io.StringIO()
    # Weights: the rough cost of each step; the display scales them by the actual pace.
    progress = harness.Progress([1.0, 1.0, 2.0, 4.0], stream, clock=lambda: now[0])
    progress.step("first")
    now[0] += 10  # the first step (weight 1) took 10 s: 7 weights to come, 70 s
    progress.step("second")
    now[0] += 10  # 2 weights in 20 s: 6 to come, 60 s
    progress.step("third")
    now[0] += 40  # 4 weights in 60 s: 4 to come, 60 s
    progress.step("fourth")
    now[0] += 5
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "[1/4] 0:00 first ...",
        "[2/4] 0:10 (~1:10 left) second ...",
        "[3/4] 0:20 (~1:00 left) third ...",
        "[4/4] 1:00 (~1:00 left) fourth ...",
        "[4/4] 1:05 measured",
    ]


def test_every_part_announces_exactly_the_steps_it_weighs() -> None:
    """The weights list is the plan of the progress display: one per step, in order."""
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    for argv in (["--quick"], ["--repeats", "3"], ["--processes", "1", "2", "4"]):
        settings = options.settings(parser.parse_args(argv))
        for variants in (harness.VARIANTS, (harness.CTYPES,)):
            plans = command._Plans.for_(settings, variants)
            safeshm = len(counter.SAFESHM) * len(variants)
            cells = (len(counter.IMPLEMENTATIONS) - len(counter.SAFESHM) + safeshm) * len(
                settings.processes
            )
            per_cell = settings.repeats + (0 if settings.quick else 2)
            assert len(counter.weights(settings, variants)) == cells * per_cell
            assert all(w > 0 for w in plans.weights(settings))


# -- the project's goals live in benchmarks/, not in the package ------------------------------
def test_safeshm_bench_reports_no_goals(
    measured: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    results = json.loads(measured[0])
    assert "bars" not in results and "goals" not in results
    status, out, _ = run_main(["bench", "--from-json", str(measured[2])], capsys)
    assert status == 0
    for word in ("[FAIL]", "[PASS]", "[SKIP]", "Bars", "goal", "required"):
        assert word not in out, word


def saved_with(measured: tuple[str, str, Path], tmp_path: Path, ratio: float) -> Path:
    """The tiny measurement's results with every ratio set to ``ratio``."""
    results = json.loads(measured[0])
    for r in results["ratios"]:
        r["ratio"] = ratio
    path = tmp_path / f"ratios-{ratio}.json"
    path.write_text(json.dumps(results))
    return path


def test_goals_script_reports_goals_as_goals(
    measured: tuple[str, str, Path], tmp_path: Path
) -> None:
    missed = saved_with(measured, tmp_path, 0.5)
    proc = run_script("bench_counter.py", "--from-json", str(missed))
    assert proc.returncode == 0, proc.stderr  # a missed goal is not a failed run...
    assert "Goals: the safeshm project's own targets" in proc.stdout
    assert (
        "[MISSED] [ctypes] SafeCounter add, 1 process, vs the mp.Value idiom (1 process): "
        "0.500x (goal >= 1.2x)"
    ) in proc.stdout
    # Only 1 process was measured: the 2-process goals are not missed, just not measured.
    assert "[not measured] [ctypes] SafeCounter add, 2 processes" in proc.stdout
    assert "SafeQueue" not in proc.stdout  # goals of structures not run are not listed
    proc = run_script("bench_counter.py", "--from-json", str(missed), "--check-goals")
    assert proc.returncode == 3, proc.stderr  # ...unless asked to check them
    met = saved_with(measured, tmp_path, 50.0)
    proc = run_script("bench_counter.py", "--from-json", str(met), "--check-goals")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[met] [ctypes] SafeCounter add, 1 process" in proc.stdout
    assert "MISSED" not in proc.stdout


def test_goals_script_json_lists_goals_and_marks_the_chart(
    measured: tuple[str, str, Path], tmp_path: Path
) -> None:
    proc = run_script("goals.py", "--from-json", str(measured[2]), "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    goals = {g["description"]: g for g in results["goals"]}
    goal = goals["[ctypes] SafeCounter add, 1 process, vs the mp.Value idiom (1 process)"]
    assert goal["required"] == 1.2 and goal["comparison"] == ">="
    assert goal["status"] in ("met", "MISSED")
    marks = {(r["label"], r["versus"]): r["goal"] for r in results["ratios"]}
    assert marks["SafeCounter.add, 1 process, ctypes", "mp.Value idiom"] == 1.2
    assert marks["ShardedCounter.add, 1 process, ctypes", "mp.Value idiom"] == 4.0
    assert marks["SafeCounter.add, 1 process, ctypes", "mp.Lock + RawValue"] is None
    if "native" in results["config"]["variants"]:
        # The compiled core's bars (issue 12).
        assert marks["SafeCounter.add, 1 process, native", "mp.Value idiom"] == 8.0
        assert marks["SafeCounter.add, 1 process, native", "mp.Lock + RawValue"] == 3.0
        assert marks["ShardedCounter.add, 1 process, native", "mp.Value idiom"] == 12.0


# -- a wrong result is a failure, not a figure ---------------------------------------------------
def test_a_lost_update_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = counter.prepare

    def one_short(ctx: Any, implementation: str, n: int) -> harness.Contender:
        contender = real(ctx, implementation, n)
        return dataclasses.replace(contender, read_count=lambda: contender.read_count() - 1)

    monkeypatch.setattr(counter, "prepare", one_short)
    status, out, err = run_main(["bench", *TINY], capsys)
    assert status == 1
    assert "BENCHMARK FAILED" in err and "updates were lost or duplicated" in err
    assert out == ""


# -- the package's rooms --------------------------------------------------------------------------
def test_the_benchmark_package_never_imports_the_cli() -> None:
    modules = ", ".join(
        f"safeshm._bench.{m}"
        for m in (
            "options",
            "harness",
            "counter",
            "lock",
            "array",
            "queue",
            "store",
            "report",
            "chart",
            "command",
        )
    )
    code = (
        f"import sys, {modules}\n"
        "assert 'safeshm._cli' not in sys.modules, 'safeshm._bench imported the CLI'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_cli_imports_the_measuring_code_only_for_bench() -> None:
    code = (
        "import sys\n"
        "from safeshm import _cli\n"
        "_cli._parser()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('safeshm._bench'))\n"
        "assert loaded == ['safeshm._bench', 'safeshm._bench.options'], loaded\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# -- the chart's layout --------------------------------------------------------------------------
def test_axis_ticks_never_crowd() -> None:
    assert chart._axis_ticks(0.4, 60.0) == [0.5, 1, 2, 5, 10, 20, 50]
    # Over more decades, powers of ten only: 500x, 1000x and 2000x would print over each other.
    assert chart._axis_ticks(0.4, 6000.0) == [1, 10, 100, 1000]


@pytest.mark.parametrize("log", [True, False])
def test_every_figure_ends_inside_the_axes_not_in_the_legend(log: bool) -> None:
    ratios = [
        chart.Ratio("S", "get", "shelve + flock", 2583.5),
        chart.Ratio("S", "get", "diskcache", 10.0),
        chart.Ratio("S", "set", "diskcache", 3.95, 4.0),
    ]  # "3.95x  (goal 4x)"
    plot_pt = 72 * (chart._FIG_WIDTH - chart._LEFT - chart._RIGHT)
    values = [r.ratio for r in ratios]
    lo, hi = min([*values, 1.0]), max(values)
    xmin, xmax = chart._x_limits(ratios, log=log, lo=lo, hi=hi, plot_pt=plot_pt)

    def fraction(x: float) -> float:  # where x lies across the axes, from 0 to 1
        if log:
            return (math.log(x) - math.log(xmin)) / (math.log(xmax) - math.log(xmin))
        return (x - xmin) / (xmax - xmin)

    for r in ratios:
        end = max(r.ratio, r.goal or 0.0)
        text_pt = chart._LABEL_OFFSET_PT + chart._LABEL_CHAR_PT * len(chart._label_text(r))
        assert fraction(end) + text_pt / plot_pt <= 1.0, r


# -- native and ctypes side by side --------------------------------------------------------------
def test_every_safeshm_row_is_measured_with_each_implementation(
    measured: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    results = json.loads(measured[0])
    variants = ["native", "ctypes"] if NATIVE_BUILT else ["ctypes"]
    assert results["config"]["variants"] == variants
    env = results["environment"]
    assert env["this_process_implementation"] == safeshm.implementation()
    if NATIVE_BUILT:
        assert env["implementations"] == "native and ctypes, side by side"
    rows = {(r["implementation"], r["variant"]) for r in results["results"]}
    assert rows == {
        ("mp.Value idiom", None),
        ("mp.Lock + RawValue", None),
        *((impl, v) for impl in ("SafeCounter", "ShardedCounter") for v in variants),
    }
    # The tables: a column per implementation, every safeshm row with a figure in each.
    status, out, err = run_main(["bench", "--from-json", str(measured[2])], capsys)
    assert status == 0, err
    assert re.search(r"^implementation +procs +native +ctypes +native +ctypes", out, re.M), out
    for impl in ("SafeCounter", "ShardedCounter"):
        line = next(x for x in out.splitlines() if re.match(rf"{impl} +1 ", x))
        figures = re.findall(r"\d+\.\d{3}(?= )", line)  # Mops/s: three decimals
        if NATIVE_BUILT:
            assert len(figures) == 2, line
        else:
            assert "n/a" in line, line
    idiom = next(x for x in out.splitlines() if re.match(r"mp\.Value idiom +1 ", x))
    assert len(re.findall(r"\d+\.\d{3}(?= )", idiom)) == 1  # measured once


QUIET_1P = ("--processes", "1", "--json", "--quiet")


def copy_without_extension(tmp_path: Path) -> Path:
    """A copy of the safeshm package without its compiled core, as a pure install has."""
    root = tmp_path / "pure"
    shutil.copytree(
        Path(safeshm.__file__).parent,
        root / "safeshm",
        ignore=shutil.ignore_patterns("_native*.so", "_native*.pyd", "__pycache__"),
    )
    return root


def test_without_the_compiled_core_the_native_column_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_without_extension(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SAFESHM_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run(
        [sys.executable, "-m", "safeshm", "bench", "--quick", "--structures", "lock", *QUIET_1P],
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT * 2,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr  # not an error
    results = json.loads(proc.stdout)
    assert results["config"]["variants"] == ["ctypes"]
    assert results["environment"]["this_process_implementation"] == "ctypes"
    assert results["environment"]["implementations"].startswith(
        "ctypes (native: not measured, the compiled core is not built or does not load"
    )
    assert {(r["implementation"], r["variant"]) for r in results["lock"]} == {
        ("mp.Lock", None),
        ("SafeLock", "ctypes"),
    }
    saved = tmp_path / "pure.json"
    saved.write_text(proc.stdout)
    status, out, err = run_main(["bench", "--from-json", str(saved)], capsys)
    assert status == 0, err
    line = next(x for x in out.splitlines() if re.match(r"SafeLock +1 ", x))
    assert "n/a" in line
    assert "n/a: not measured with that implementation here" in out


def test_each_measuring_process_and_its_workers_use_its_implementation() -> None:
    ctx = harness.context(quick=True)
    with harness.Agents(quick=True) as agents:
        assert agents.variants == (("native", "ctypes") if NATIVE_BUILT else ("ctypes",))
        for variant in agents.variants:
            got = agents.run(ctx, variant, harness.worker_implementation, time_limit_s=30)
            assert got == variant
        # A measurement that fails there fails here, saying where it ran.
        with pytest.raises(
            harness.BenchError, match=r"^ctypes implementation: ValueError: unknown counter"
        ):
            agents.measure(ctx, counter.prepare, "Nope [ctypes]", 1, 10, time_limit_s=30)
    # This process's contenders are measured here, whatever the agents.
    assert harness.untagged("mp.Value idiom") == ("mp.Value idiom", None)
    assert harness.untagged(harness.tagged("SafeQueue, lists", "native")) == (
        "SafeQueue, lists",
        "native",
    )


# -- the goals, on synthetic results -----------------------------------------------------------
def load_goals() -> Any:
    spec = importlib.util.spec_from_file_location("safeshm_bench_goals", SCRIPTS / "goals.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def synthetic(python: str, safeshm_speed: float = 50.0, **slower: float) -> dict[str, Any]:
    """Results as `safeshm bench --json` prints them for counter, lock, array and queue at
    1 and 2 processes with both implementations, without measuring: every stdlib and peer
    contender does 1 M ops/s, every safeshm one ``safeshm_speed`` times that (a
    ShardedCounter twice that with 2 processes), except the contenders named in
    ``slower``, ``name=factor`` times slower (``SafeQueue_native=2``). SafeQueue's round
    trip is 3 times as fast as the others'."""
    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    settings = options.settings(
        parser.parse_args(["--structures", "counter", "lock", "array", "queue"])
    )
    variants = harness.VARIANTS
    array_plan = array.Plan("2.0", array.ARRAY_IMPLEMENTATIONS, bulk=False, notes=[])
    queue_plan = queue.Plan("1.5", dict(queue.QUEUE_CONTENDERS), notes=[])

    def rate(name: str, p: int) -> float:
        base, variant = harness.untagged(name)
        if variant is None:
            return 1e6
        r = 1e6 * safeshm_speed * (2 if base == "ShardedCounter" and p == 2 else 1)
        return r / slower.get(f"{base.replace(' ', '_').replace(',', '')}_{variant}", 1.0)

    def cells(names: tuple[str, ...]) -> dict[tuple[str, int], harness.Cell]:
        return {
            (n, p): harness.Cell(n, p, 1000, (rate(n, p),))
            for p in settings.processes
            for n in names
        }

    def rtt(name: str) -> float:
        return 10e-6 if harness.untagged(name)[1] else 30e-6

    measured_ = command._Measured(
        counter_cells=cells(counter.contenders(variants)),
        lock_cells=cells(lock.contenders(variants)),
        array_cells=cells(array.element_contenders(array_plan, variants)),
        queue_cells={
            w: cells(queue.contenders(queue_plan, w, variants)) for w in queue.QUEUE_WORKLOADS
        },
        latency={
            n: queue.LatencyCell(n, 100, (rtt(n),), (2 * rtt(n),))
            for n in queue.contenders(queue_plan, queue.LATENCY, variants)
        },
    )
    env = {"python": f"{python} (main, Jan 1 2026, 00:00:00) [GCC 12.2.0]"}
    plans = command._Plans(array_plan, queue_plan, variants)
    return command._results(env, settings, plans, measured_)


def test_issue_12_bars_are_goals_found_in_the_results() -> None:
    goals = load_goals()
    checked = {g["description"]: g for g in goals.evaluate(synthetic("3.11.9"))}
    # Every goal of the structures measured is found, but the bulk sum's (not measured).
    assert [d for d, g in checked.items() if g["status"] != "met"] == [
        "bulk sum via SafeArray.locked() + numpy, time vs numpy on a private array"
    ]
    required = {d: g["required"] for d, g in checked.items()}
    native = {
        "[native] SafeCounter add, 1 process, vs the mp.Value idiom (1 process)": 8,
        "[native] SafeCounter add, 1 process, vs mp.Lock + RawValue (1 process)": 3,
        "[native] SafeCounter add, 2 processes, vs the mp.Value idiom (2 processes)": 8,
        "[native] ShardedCounter add, 1 process, vs the mp.Value idiom (1 process)": 12,
        "[native] ShardedCounter add, 2 processes, vs its own 1-process rate": 1.8,
        "[native] `with SafeLock:` uncontended (1 process), vs `with multiprocessing.Lock():`": 2,
        "[native] SafeArray element add at random indices, 1 process, vs the mp.Array idiom "
        "(1 process)": 6,
        "[native] SafeQueue small items, 1P/1C, vs mp.Queue (1P/1C)": 3,
        "[native] SafeQueue small items, 2P/2C, vs mp.Queue (2P/2C)": 3,
        "[native] SafeQueue small items, 1P/1C, vs faster_fifo (1P/1C)": 1.5,
        "[native] SafeQueue small items, 2P/2C, vs faster_fifo (2P/2C)": 1.5,
        "[native] SafeQueue put_many/get_many in batches of 100, 1P/1C, vs mp.Queue single "
        "put/get (1P/1C)": 10,
        "[native] SafeQueue put_many/get_many in batches of 100, 2P/2C, vs mp.Queue single "
        "put/get (2P/2C)": 10,
    }
    for description, bar in native.items():
        assert required[description] == bar, description
    # The ctypes fallback keeps the bars it had (no regression), and nothing more.
    ctypes_bars = {
        d[len("[ctypes] ") :]: r for d, r in required.items() if d.startswith("[ctypes]")
    }
    assert ctypes_bars["SafeCounter add, 1 process, vs the mp.Value idiom (1 process)"] == 1.2
    assert ctypes_bars["ShardedCounter add, 2 processes, vs its own 1-process rate"] == 1.7
    assert not any("SafeLock" in d for d in ctypes_bars)
    # A stricter native bar replaces the ctypes bar it implies: one goal per ratio.
    assert len([d for d in required if "[native] SafeCounter add, 1 process, vs the mp" in d]) == 1
    # The old bars the compiled core has no stricter bar for apply to it as well.
    assert required["[native] SafeQueue raw 64 KiB bytes items, 1P/1C, vs mp.Queue (1P/1C)"] == 4


def test_a_slow_native_figure_misses_its_bar_and_only_that() -> None:
    goals = load_goals()
    # The native SafeLock 20x slower: 2.5x mp.Lock, still above the bar of 2x...
    checked = goals.evaluate(synthetic("3.11.9", SafeLock_native=20))
    assert not [g for g in checked if g["status"] == "MISSED"]
    # ...and 30x slower: 1.67x, below it.
    checked = goals.evaluate(synthetic("3.11.9", SafeLock_native=30))
    missed = [g["description"] for g in checked if g["status"] == "MISSED"]
    assert missed == [
        "[native] `with SafeLock:` uncontended (1 process), vs `with multiprocessing.Lock():`"
    ]


def test_synthetic_results_print_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    command.print_report(synthetic("3.13.0"))
    out = capsys.readouterr().out
    for title in ("SafeCounter and ShardedCounter", "SafeLock:", "SafeArray:", "SafeQueue:"):
        assert title in out
    assert "n/a" not in out  # both implementations measured
    assert re.search(r"^SafeQueue +1\+1 +50000\.0 +50000\.0 ", out, re.M), out


def save(tmp_path: Path, name: str, results: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def test_goals_across_pythons_compare_two_saved_results(tmp_path: Path) -> None:
    old = save(tmp_path, "py311.json", synthetic("3.11.9"))
    # On 3.13 the native SafeQueue is 1.3x slower than on 3.11 (every ratio of it 77 %
    # of 3.11's: more than 20 % lower), the ctypes SafeCounter 1.2x (83 %: within).
    slow = save(
        tmp_path,
        "py313-slow.json",
        synthetic("3.13.0", SafeQueue_native=1.3, SafeCounter_ctypes=1.2),
    )
    for mine, other in ((slow, old), (old, slow)):  # either order: newer over older
        proc = run_script("goals.py", "--from-json", mine, "--compare-with", other, "--check-goals")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "Goals across Pythons" in proc.stdout
        missed = [x for x in proc.stdout.splitlines() if "[MISSED]" in x]
        assert missed and all("Python 3.13 over Python 3.11" in x for x in missed), missed
        assert all(", native vs " in x and "SafeQueue" in x for x in missed), missed
        assert "[met] SafeCounter & ShardedCounter: SafeCounter.add, 1 process, ctypes vs " in (
            proc.stdout
        )
    fine = save(tmp_path, "py313.json", synthetic("3.13.0", SafeCounter_native=1.2))
    proc = run_script("goals.py", "--from-json", fine, "--compare-with", old, "--check-goals")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISSED" not in proc.stdout
    proc = run_script("goals.py", "--from-json", fine, "--compare-with", old, "--json")
    assert proc.returncode == 0, proc.stderr
    across = json.loads(proc.stdout)["cross_python_goals"]
    assert across and all(g["status"] == "met" and g["required"] == 0.8 for g in across)
    # Only what both runs measured: a 3.13 run of the lock alone is compared on the lock.
    lock_only = synthetic("3.13.0")
    lock_only["config"]["structures"] = ["lock"]
    lock_only["ratios"] = [r for r in lock_only["ratios"] if r["structure"] == "SafeLock"]
    mine = save(tmp_path, "py313-lock.json", lock_only)
    proc = run_script("goals.py", "--from-json", mine, "--compare-with", old, "--json")
    across = json.loads(proc.stdout)["cross_python_goals"]
    assert {g["description"].split(":")[0] for g in across} == {"SafeLock"}
    assert len(across) == 4  # 1 and 2 processes, native and ctypes


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ("same", "both results come from Python 3.11"),
        ("missing", "cannot read --compare-with"),
        ("bad", "--compare-with"),
    ],
)
def test_goals_across_pythons_refuse_what_cannot_be_compared(
    tmp_path: Path, other: str, message: str
) -> None:
    mine = save(tmp_path, "a.json", synthetic("3.11.9"))
    path = {
        "same": save(tmp_path, "b.json", synthetic("3.11.4")),
        "missing": str(tmp_path / "nope.json"),
        "bad": write(tmp_path / "c.json", "[]"),
    }[other]
    proc = run_script("goals.py", "--from-json", mine, "--compare-with", path, "--check-goals")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr and proc.stdout == ""


def test_results_saved_before_the_compiled_core_read_as_ctypes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = ROOT / "docs" / "assets" / "16-cores" / "counter.json"
    assert "variants" not in json.loads(saved.read_text())["config"]
    status, out, err = run_main(["bench", "--from-json", str(saved)], capsys)
    assert status == 0, err
    assert command.LEGACY_IMPLEMENTATIONS in out
    line = next(x for x in out.splitlines() if re.match(r"SafeCounter +1 ", x))
    assert re.match(r"SafeCounter +1 +n/a +0\.991 +n/a +0\.56x", line), line
    proc = run_script("goals.py", "--from-json", str(saved))
    assert proc.returncode == 0, proc.stderr
    assert "[MISSED] [ctypes] SafeCounter add, 1 process, vs the mp.Value idiom" in proc.stdout
    assert "[not measured] [native] SafeCounter add, 1 process" in proc.stdout
