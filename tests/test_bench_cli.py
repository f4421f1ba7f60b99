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
import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safeshm
from safeshm import _compat
from safeshm._bench import chart, command, counter, harness, options
from safeshm._cli import main

from ._helpers import JOIN_TIMEOUT

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
    # 4 implementations x (warm-up, calibration, 1 repeat), counted in advance exactly.
    assert len(steps) == 13
    assert all(STEP.match(line) for line in steps[:-1]), steps
    assert steps[0].startswith("[ 1/12] ")
    assert "left" not in steps[0]  # nothing done yet: no estimate
    assert all(" left) counter: " in line for line in steps[1:-1]), steps
    assert re.match(r"^\[12/12\] \d+:\d\d measured$", steps[-1])
    assert "\r" not in stderr and "\x1b" not in stderr  # not a terminal: plain lines


def test_json_lists_the_ratios_the_chart_draws(measured: tuple[str, str, Path]) -> None:
    results = json.loads(measured[0])
    ratios = results["ratios"]
    assert {(r["label"], r["versus"]) for r in ratios} == {
        (f"{impl}.add, 1 process", alt)
        for impl in ("SafeCounter", "ShardedCounter")
        for alt in ("mp.Value idiom", "mp.Lock + RawValue")
    }
    for r in ratios:
        assert set(r) == {"structure", "label", "versus", "ratio", "goal"}
        assert r["structure"] == "SafeCounter & ShardedCounter"
        assert r["ratio"] > 0
        # The project's goals are not a user's concern: `safeshm bench` sets none.
        assert r["goal"] is None
    ratio = {(r["label"], r["versus"]): r["ratio"] for r in ratios}
    row = {(r["implementation"], r["processes"]): r for r in results["results"]}
    assert ratio["SafeCounter.add, 1 process", "mp.Value idiom"] == pytest.approx(
        row["SafeCounter", 1]["vs_idiom_same_processes"]
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
    "script", ["bench_counter.py", "bench_array.py", "bench_queue.py", "bench_store.py", "goals.py"]
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
    # No warm-up, no calibration: one step per implementation, then "measured".
    assert len(steps) == 5, steps
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
        plans = command._Plans.for_(settings)
        cells = len(counter.IMPLEMENTATIONS) * len(settings.processes)
        per_cell = settings.repeats + (0 if settings.quick else 2)
        assert len(counter.weights(settings)) == cells * per_cell
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
        "[MISSED] SafeCounter add, 1 process, vs the mp.Value idiom (1 process): 0.500x "
        "(goal >= 1.2x)"
    ) in proc.stdout
    # Only 1 process was measured: the 2-process goals are not missed, just not measured.
    assert "[not measured] SafeCounter add, 2 processes" in proc.stdout
    assert "SafeQueue" not in proc.stdout  # goals of structures not run are not listed
    proc = run_script("bench_counter.py", "--from-json", str(missed), "--check-goals")
    assert proc.returncode == 3, proc.stderr  # ...unless asked to check them
    met = saved_with(measured, tmp_path, 50.0)
    proc = run_script("bench_counter.py", "--from-json", str(met), "--check-goals")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[met] SafeCounter add, 1 process" in proc.stdout
    assert "MISSED" not in proc.stdout


def test_goals_script_json_lists_goals_and_marks_the_chart(
    measured: tuple[str, str, Path], tmp_path: Path
) -> None:
    proc = run_script("goals.py", "--from-json", str(measured[2]), "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    goals = {g["description"]: g for g in results["goals"]}
    goal = goals["SafeCounter add, 1 process, vs the mp.Value idiom (1 process)"]
    assert goal["required"] == 1.2 and goal["comparison"] == ">="
    assert goal["status"] in ("met", "MISSED")
    marks = {(r["label"], r["versus"]): r["goal"] for r in results["ratios"]}
    assert marks["SafeCounter.add, 1 process", "mp.Value idiom"] == 1.2
    assert marks["ShardedCounter.add, 1 process", "mp.Value idiom"] == 4.0
    assert marks["SafeCounter.add, 1 process", "mp.Lock + RawValue"] is None


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
